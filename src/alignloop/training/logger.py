"""What a training loop reports per step: metrics.jsonl, the experiment trackers and the progress bar."""

from __future__ import annotations

from tqdm.auto import tqdm

from alignloop.runs import MetricsLog, RunDir


class StepLogger:
    """One per loop; writes on the main process only. On resume, metrics.jsonl lines past the checkpoint
    are dropped (the file then reads as an uninterrupted run's); a fresh run starts an empty file."""

    def __init__(self, acc, run: RunDir, total_steps: int, resumed_at: int | None, description: str,
                 tracker_config: dict | None = None):
        self.acc = acc
        self.main = acc.is_main_process
        self.metrics = MetricsLog(run.metrics_path, enabled=self.main)
        self.metrics.truncate_after(-1 if resumed_at is None else resumed_at)
        if acc.log_with and tracker_config is not None:
            acc.init_trackers("alignloop", config=flat_config(tracker_config))
        self.bar = tqdm(total=total_steps, initial=resumed_at or 0, desc=description, disable=not self.main,
                        dynamic_ncols=True, leave=False)

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (``record`` holds "step"); its numbers also go to the trackers."""
        if not self.main:
            return
        self.metrics.write(record)
        self.acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                     step=record["step"])

    def advance(self, **postfix) -> None:
        """One optimizer step done; ``postfix`` is shown next to the bar."""
        if postfix:
            self.bar.set_postfix(**postfix)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def flat_config(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"train.lr": ...} of the scalar types trackers accept."""
    out: dict = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "none"
        else:
            out[key] = str(v)
    return out
