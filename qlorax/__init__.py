"""qlorax: declarative QLoRA fine-tuning of LLMs on Intel Xeon CPUs."""

__version__ = "0.1.0"
