"""The vLLM worker: runs in the engine environment (.venv-engine), started by `vllm_client.VllmEngine`.

vLLM pins its own torch and transformers, so it cannot live in the platform's environment; this
script imports nothing of the platform. It reads length-prefixed JSON frames on stdin and answers
each on the original stdout (fd 1 is pointed at stderr before vLLM is imported, so no log line can
corrupt the channel):

    {"op": "init", "model": DIR, "dtype": "float32", "max_model_len": 256, "seed": 0, "enforce_eager": null}
        -> {"ok": true, "vllm": VERSION, "device": "cpu"}
    {"op": "generate", "prompts": [...], "images": [{"width", "height", "rgb": base64}], "params": {...}}
        -> {"ok": true, "outputs": [{"text", "prompt_tokens", "completion_tokens", "finish_reason"}], "seconds": s}

A request that fails answers {"ok": false, "error": one line}; end of stdin stops the worker.
vLLM spawns engine processes, hence the `__main__` guard.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

HEADER = struct.Struct(">I")
CPU_KV_CACHE_BYTES = 2 << 30


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return json.loads(stream.read(size))


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


class Worker:
    def __init__(self) -> None:
        self.llm: Any = None

    def init(self, message: dict[str, Any]) -> dict[str, Any]:
        import torch
        import vllm

        cuda = torch.cuda.is_available()
        eager = message.get("enforce_eager")
        engine_args = dict(message.get("engine_args", {}))
        if not cuda and "gpu_memory_utilization" not in engine_args:
            # On CPU vLLM reserves 92% of the machine's memory for its KV cache unless told a size.
            engine_args.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        self.llm = vllm.LLM(
            model=message["model"],
            dtype=message["dtype"],  # never "auto": on CPU it runs an fp32 checkpoint in bf16
            max_model_len=message["max_model_len"],
            seed=message.get("seed", 0),
            enforce_eager=(not cuda) if eager is None else eager,  # graph capture costs minutes on CPU
            limit_mm_per_prompt={"image": 1},
            **engine_args,
        )
        return {"ok": True, "vllm": vllm.__version__, "device": "cuda" if cuda else "cpu"}

    def generate(self, message: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image
        from vllm import SamplingParams

        images = [
            Image.frombytes("RGB", (i["width"], i["height"]), base64.b64decode(i["rgb"])) for i in message["images"]
        ]
        inputs = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(message["prompts"], images)]
        began = time.perf_counter()
        results = self.llm.generate(inputs, SamplingParams(**message["params"]), use_tqdm=False)
        seconds = time.perf_counter() - began
        outputs = []
        for result in results:
            completion = result.outputs[0]
            outputs.append({
                "text": completion.text,
                "prompt_tokens": len(result.prompt_token_ids or []),
                "completion_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason or "stop",
            })
        return {"ok": True, "outputs": outputs, "seconds": seconds}


def _die_with_parent() -> None:
    """When the job that started this worker dies (even by SIGKILL), kill the worker's whole process
    group: vLLM's engine processes do not notice their parent's death and would hold their memory
    (~4 GB each on CPU). The client starts the worker in a session of its own, so the group is
    exactly the worker and the engine processes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    _die_with_parent()
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # vLLM and its engine processes print to fd 1: send that to stderr
    requests = sys.stdin.buffer
    worker = Worker()
    while (message := read_frame(requests)) is not None:
        try:
            handler = {"init": worker.init, "generate": worker.generate}[message["op"]]
            reply = handler(message)
        except Exception as exc:  # one line back to the client; the worker stays up for the next request
            reply = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]}
        write_frame(channel, reply)


if __name__ == "__main__":
    main()
