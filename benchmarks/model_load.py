"""Model load times: the embedded SmolLM2 (first GGUF conversion and cached reload) and
tiny-llama.

    python benchmarks/model_load.py            # uses a fresh temporary cache

Prints one line per measurement (seconds, wall clock).
"""

from __future__ import annotations

import os
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LLM_INFLUENCE_CACHE"] = cache
        from llm_influence.models import load_model

        t = time.perf_counter()
        load_model("tiny-llama")
        print(f"tiny-llama, first load (extracts the tokenizer from the GGUF): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        load_model("tiny-llama")
        print(f"tiny-llama, cached tokenizer: {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        load_model("smollm2-135m")
        print(f"smollm2-135m, first load (GGUF de-quantization + safetensors cache): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        load_model("smollm2-135m")
        print(f"smollm2-135m, cached reload: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
