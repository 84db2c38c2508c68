"""alignloop: SFT, reward modelling and RLHF with PPO, with the people who give feedback inside the loop."""

__version__ = "0.1.0"
