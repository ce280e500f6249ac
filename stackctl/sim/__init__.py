"""stackctl.sim: a stand-in vLLM engine with vLLM's OpenAI HTTP API and Prometheus metrics,
whose latencies follow a documented physical timing model (see timing.py, profiles.py).

Run it with ``python -m stackctl.sim --port 8000 ...`` (the flags are vLLM's, see config.py).
"""
