"""One home for sampling from a causal LM, used by every stage that generates.

rollout      what a sampler returns (prompt / response tensors, log-probs) and the log-prob helpers
sampler      the Sampler interface and its transformers backend; token sampling for serve's engine
streaming    the request side of a streaming engine (serve): text deltas, queue and stop errors
vllm         the vLLM engine (serve's ``--engine vllm`` today; the RL backend comes next)
"""
