"""Models the project builds itself: tiny offline SD1.5/SDXL models and LoRAs, and the embedded default."""
