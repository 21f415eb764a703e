"""The Triton model repository: one config.pbtxt template for every served model, and the layout.

```
<repo>/
  captioner/config.pbtxt    captioner/1/model.py    captioner/1/weights/...   (the checkpoint)
  chat/config.pbtxt         chat/1/model.py         chat/1/weights/...
  chat_stream/config.pbtxt  chat_stream/1/model.py  (decoupled; uses chat/1/weights)
  manifest.json             (written last by the exporter: every file + sha256)
```

`model.py` imports the one adapter class (`ADAPTER`, committed as `serving/*/1/model.py`); the config is
rendered from the recipe's `serving` section: `KIND_GPU` for the cluster, `KIND_CPU` locally,
`max_batch_size`, `dynamic_batching { max_queue_delay_microseconds }`, and the model's settings
(weights folder, template, generation defaults, limits) as `parameters`. The committed
`serving/*/config.pbtxt` are this template rendered for the a100-7b profile (a test keeps them and
the adapters in sync; `python -m sharegpt4v.serving.repository` rewrites them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sharegpt4v.errors import PlatformError
from sharegpt4v.serving.protocol import INPUTS, OUTPUTS, ServingOptions

# Triton model name -> task. `chat_stream` is the decoupled (token-streaming) twin of `chat`.
MODEL_TASKS = {"captioner": "caption", "chat": "chat", "chat_stream": "chat"}
EXPORTABLE = ("captioner", "chat")
STREAM_MODEL = "chat_stream"
STREAM_WEIGHTS = "../../chat/1/weights"  # relative to chat_stream/1: the repository holds one copy
KINDS = ("KIND_GPU", "KIND_CPU")
COMMITTED_PROFILE = "a100-7b"

_TEMPLATE = """\
# Rendered by sharegpt4v.serving.repository from the recipe's `serving` section.
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
{transaction}input [
{inputs}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {count}
    kind: {kind}
  }}
]
parameters [
{parameters}
]
"""


# The model.py of every served model: Triton looks `TritonPythonModel` up in this file; the class
# lives in the core (`sharegpt4v.serving.triton_model`), which the serving image installs.
# serving/*/1/model.py are its committed copies.
ADAPTER = '''"""Triton Python-backend model: the class is `sharegpt4v.serving.triton_model.TritonPythonModel`."""

from sharegpt4v.serving.triton_model import TritonPythonModel  # noqa: F401  (Triton looks it up here)
'''


class RepositoryError(PlatformError):
    pass


def serving_dir() -> Path:
    """The project's `serving/` folder, where the rendered configs and adapters are committed."""
    return Path(__file__).resolve().parents[2] / "serving"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_config(
    name: str,
    options: ServingOptions,
    *,
    kind: str,
    max_batch_size: int,
    max_queue_delay_us: int,
    count: int = 1,
    decoupled: bool = False,
    extra_parameters: dict[str, str] | None = None,
) -> str:
    """config.pbtxt text for one served model."""
    if kind not in KINDS:
        raise RepositoryError(f"instance kind: {kind!r} is not one of {', '.join(KINDS)}")
    if max_batch_size < 1 or count < 1 or max_queue_delay_us < 0:
        raise RepositoryError("max_batch_size and count must be >= 1, max_queue_delay_us >= 0")

    def tensor(spec: Any) -> str:
        optional = " optional: true" if spec.optional else ""
        return f"  {{ name: {_quote(spec.name)} data_type: {spec.dtype} dims: [ -1 ]{optional} }}"

    parameters = {**options.to_parameters(), **(extra_parameters or {})}
    return _TEMPLATE.format(
        name=name,
        max_batch_size=max_batch_size,
        transaction="model_transaction_policy {\n  decoupled: true\n}\n" if decoupled else "",
        inputs=",\n".join(tensor(s) for s in INPUTS[options.task]),
        outputs=",\n".join(tensor(s) for s in OUTPUTS),
        max_queue_delay_us=max_queue_delay_us,
        count=count,
        kind=kind,
        parameters=",\n".join(
            f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in sorted(parameters.items())
        ),
    )


def model_configs(
    recipe: Any,
    names: list[str] | tuple[str, ...] = EXPORTABLE,
    kind: str | None = None,
    extra_parameters: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """{model name: config.pbtxt} for the served models `names` (`chat` brings `chat_stream` when
    `serving.streaming`), from the recipe's `serving` section; `kind` overrides `serving.instance_kind`."""
    from sharegpt4v.serving.engine import options_for

    serving = recipe.serving
    unknown = [n for n in names if n not in EXPORTABLE]
    if unknown:
        raise RepositoryError(f"model {unknown[0]!r}: not a served model (known: {', '.join(EXPORTABLE)})")
    wanted = list(names) + ([STREAM_MODEL] if "chat" in names and serving.streaming else [])
    configs = {}
    for name in wanted:
        task = MODEL_TASKS[name]
        weights = STREAM_WEIGHTS if name == STREAM_MODEL else "weights"
        configs[name] = render_config(
            name,
            options_for(task, recipe, weights=weights),
            kind=kind or serving.instance_kind,
            max_batch_size=serving.max_batch_size,
            max_queue_delay_us=serving.max_queue_delay_us,
            count=serving.instance_count,
            decoupled=name == STREAM_MODEL,
            extra_parameters=(extra_parameters or {}).get("chat" if name == STREAM_MODEL else name),
        )
    return configs


def committed_configs() -> dict[str, str]:
    from sharegpt4v.config import load_recipe

    return model_configs(load_recipe(COMMITTED_PROFILE))


def committed_files() -> dict[Path, str]:
    """serving/<model>/config.pbtxt (cluster settings of the a100-7b profile) and serving/<model>/1/model.py."""
    files = {}
    for name, text in committed_configs().items():
        files[serving_dir() / name / "config.pbtxt"] = text
        files[serving_dir() / name / "1" / "model.py"] = ADAPTER
    return files


def write_committed_files() -> list[Path]:
    for path, text in committed_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(committed_files())


if __name__ == "__main__":
    for path in write_committed_files():
        print(path)
