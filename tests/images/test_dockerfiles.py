"""The Dockerfiles install what pyproject.toml / constraints.txt pin, from pinned bases, as non-root."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from sharegpt4v import cluster

REPO = Path(__file__).resolve().parents[2]
IMAGES = ("train", "serving", "mlflow")
PUBLIC_REGISTRIES = ("docker.io/", "nvcr.io/")
# Server-only packages of the MLflow image that the project itself does not use (so no pin elsewhere).
IMAGE_ONLY_PINS = {"psycopg2-binary": "2.9.13", "flask-wtf": "1.3.0"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """package -> version from constraints.txt, then pyproject.toml (which must agree where both pin)."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        name = _norm(name.split("[")[0])
        assert pins.get(name, version) == version, f"pyproject.toml and constraints.txt disagree on {name}"
        pins[name] = version
    return pins


def _instructions(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "images" / image / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def _pip_installs(image: str) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    installs = []
    for keyword, args in _instructions(image):
        if keyword == "RUN":
            for command in re.split(r"&&|;", args):
                words = command.split()
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
    return installs


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned_public_images(image: str) -> None:
    bases = [args.split()[0] for keyword, args in _instructions(image) if keyword == "FROM"]
    assert bases
    for base in bases:
        assert base.startswith(PUBLIC_REGISTRIES), f"{base}: a public registry, named explicitly"
        name, _, digest = base.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert digest.startswith("sha256:") or (tag and "latest" not in tag and re.search(r"\d", tag)), base


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_a_numeric_non_root_user(image: str) -> None:
    instructions = _instructions(image)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, f"{image}: no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
    assert int(uid) == cluster.SERVING_UID  # the manifests' runAsUser
    # Nothing runs as root after the USER switch.
    after = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "USER"):]
    assert not [args for keyword, args in after if keyword == "RUN" and ("apt-get" in args or "pip install" in args)]


@pytest.mark.parametrize("image", IMAGES)
def test_every_pinned_package_matches_the_project(image: str) -> None:
    pins = _pins()
    checked = 0
    for words in _pip_installs(image):
        constrained = "-c" in words and words[words.index("-c") + 1].endswith("constraints.txt")
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
                continue
            if word in ("-c", "--index-url", "--extra-index-url"):
                skip_next = True
                continue
            if word.startswith("-"):
                continue
            if word in (".", "./"):
                assert constrained or "--no-deps" in words, f"{image}: the project without -c constraints.txt"
                continue
            name, _, version = word.strip("'\"").partition("==")
            name = _norm(name.split("[")[0])
            if not version:
                assert constrained and name in pins, f"{image}: {word} is neither pinned nor constrained"
                continue
            checked += 1
            expected = pins.get(name, IMAGE_ONLY_PINS.get(name))
            assert expected is not None, f"{image}: {name} is not a project dependency (pin it in pyproject.toml)"
            assert version == expected, f"{image}: {name}=={version}, the project pins {expected}"
    assert checked >= 1


def test_the_images_install_the_project_and_its_key_pins() -> None:
    pins = _pins()
    train = [" ".join(words) for words in _pip_installs("train")]
    assert any(f"torch=={pins['torch']}" in cmd and "--index-url" in cmd for cmd in train), "CUDA torch first"
    assert any(cmd.startswith("-c constraints.txt") and cmd.endswith(" .") for cmd in train)
    assert pins["deepspeed"]  # DeepSpeed comes with the project's dependencies at its pin
    serving = " ".join(" ".join(words) for words in _pip_installs("serving"))
    for name in ("torch", "numpy", "transformers", "tokenizers", "safetensors", "pillow", "nvidia-pytriton"):
        assert f"{name}=={pins[name]}" in serving, name
    assert pins["numpy"].startswith("1."), "numpy<2: the Triton Python-backend stub crashes on numpy 2"
    mlflow = " ".join(" ".join(words) for words in _pip_installs("mlflow"))
    assert f"mlflow=={pins['mlflow']}" in mlflow and f"boto3=={pins['boto3']}" in mlflow


def test_train_image_entrypoint_and_workdir() -> None:
    instructions = _instructions("train")
    assert ("ENTRYPOINT", '["sharegpt4v"]') in instructions
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)
    assert "python3.11" in " ".join(args for _, args in instructions)


def test_serving_image_carries_the_python_3_11_stub_of_the_pinned_wheel() -> None:
    """The stub path the serving image links is where the pinned nvidia-pytriton wheel keeps it."""
    import pytriton

    runs = " ".join(args for keyword, args in _instructions("serving") if keyword == "RUN")
    match = re.search(r"site-packages/(pytriton/\S+/triton_python_backend_stub)", runs)
    assert match, "serving image: link the Python 3.11 stub into Triton's python backend"
    assert (Path(pytriton.__file__).parent.parent / match.group(1)).is_file()
    assert "/opt/tritonserver/backends/python/triton_python_backend_stub" in runs
    assert "24.10" in dict(_instructions("serving"))["FROM"]  # Triton 2.51, the wheel's server release


@pytest.mark.parametrize("image", IMAGES)
def test_copied_files_are_in_the_build_context(image: str) -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for keyword, args in _instructions(image):
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"{image}: COPY {source}"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignore), f"{source} is .dockerignored"


def test_dockerignore_keeps_secrets_and_environments_out() -> None:
    ignore = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "*.env", "**/*.env", ".local"} <= ignore


def test_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cluster.IMAGE_TAG == version
    for image in (cluster.TRAIN_IMAGE, cluster.SERVING_IMAGE, cluster.MLFLOW_IMAGE):
        name = image.split("/")[1].partition(":")[0]
        assert (REPO / "images" / name / "Dockerfile").is_file(), image
        assert image in (REPO / "images" / "README.md").read_text()
