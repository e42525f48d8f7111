"""The product's own logic that the UI and the API share (no gradio, no fastapi): model library, memory history, ..."""
