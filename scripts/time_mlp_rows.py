"""How a decode layer's MLP cost grows with its row count (README, ADEPT speed; Engine.layer's comment):
one SmolLM2 layer's mlp_residual timed alone on random [rows, 1, D] inputs, 2 threads.
python scripts/time_mlp_rows.py"""

import time

import torch

from skipengine import Engine, load_model

if __name__ == "__main__":
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    adapter = Engine(model, tokenizer).adapter
    for rows in (1, 8, 16, 24, 32):
        hidden = torch.randn(rows, 1, model.config.hidden_size)
        with torch.inference_mode():
            for _ in range(20):  # warm-up
                adapter.mlp_residual(3, hidden)
            start = time.perf_counter()
            for _ in range(300):
                adapter.mlp_residual(3, hidden)
        print(f"{rows:>2} rows: {(time.perf_counter() - start) / 300 * 1e3:.2f} ms", flush=True)
