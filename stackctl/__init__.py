"""stackctl: deploy and operate a vLLM + LMCache serving stack on bare-metal GPU hosts over SSH."""

__version__ = "0.1.0"
