"""The datasets of the task YAMLs beside this file, read from the jsonl files beside it.

lm-evaluation-harness hands a task's ``dataset_kwargs`` to its ``custom_dataset`` function; this one
resolves ``data_files`` against this folder rather than the working directory, so the tasks run
wherever lm-eval (or ``alignloop eval --benchmarks``) is started, with any lm-eval model
(``hf``, ``local-completions`` against ``alignloop serve``, ...) and never touch the network.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_task_metadata) -> datasets.DatasetDict:
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
