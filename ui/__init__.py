"""The loracompose web UI (Gradio): compose LoRAs in a browser, compare methods side by side.

``loracompose ui`` serves it; :func:`build_app` builds it around an already loaded pipeline.
"""

import os

# Offline by default: Gradio's usage analytics would phone home (respect an explicit setting).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .app import AppSettings, LoraComposeApp, build_app, launch_app
from .server import UiOptions, resolve_settings, serve

__all__ = ["AppSettings", "LoraComposeApp", "UiOptions", "build_app", "launch_app", "resolve_settings", "serve"]
