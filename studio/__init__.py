"""The product's own logic, shared by the UI (ui/) and the API (api/): no gradio, no fastapi.

Model slots (manager.py), the default model (default_model.py) and the demo model (demo_model.py), quality on
held-out text (quality.py), the memory plan (planner.py), the Compare runner (compare.py, with its command line
`python -m studio.compare`, and workload.py), the one background-job type (jobs.py) behind Quantize
(quantize_job.py) and Compare, the engine flags shared by every command line (engine_args.py), the terminal
chat (chat.py) and client (client.py), the model library (catalog.py), the memory panel's history
(memory_history.py) and the Quantize time estimate (quant_estimate.py). This file imports nothing, so
`python -m studio.client` runs without torch.
"""
