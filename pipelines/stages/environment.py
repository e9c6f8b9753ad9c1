"""The ``environment`` stage: records the machine and the libraries a run used."""

from __future__ import annotations

from pipelines.runner import StageContext, environment, stage


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@stage("environment", version="1", params={})
def environment_stage(ctx: StageContext) -> None:
    """Record CPU, threads, torch build and bf16 support beside the run's outputs."""
    import torch

    from slicreg.io import atomic_write_json

    info = environment()
    info["cpu_model"] = cpu_model()
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
        info["cpu_has_amx_bf16"] = "amx_bf16" in flags
        info["cpu_has_avx512"] = "avx512f" in flags
    except OSError:
        pass
    atomic_write_json(ctx.path("environment.json"), info)
    ctx.log(f"{info['cpu_model']}, {info['cpu_count']} cores, torch {info['packages'].get('torch')}, "
            f"CUDA {'yes' if info['cuda_available'] else 'no'}")
