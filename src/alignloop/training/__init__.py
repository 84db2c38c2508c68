"""The parts every training loop is built from: accelerator setup, ddp / fsdp wrapping, optimizer step,
divergence check, checkpoints and resume, the step logger and finish_run. ``fit`` (supervised) and the PPO
loop use them."""
