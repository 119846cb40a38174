"""The environment every stage, flow and test runs with: no hub downloads, no telemetry.

Kept free of imports beyond ``os`` because the Hugging Face libraries read these variables
when they are first imported: callers apply them before importing anything heavy.
"""
from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set each variable unless the caller's environment already chose a value."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
