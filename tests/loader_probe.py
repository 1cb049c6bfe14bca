"""Load a checkpoint with another project's loader and write what its layers compute.

Run by tests/test_loaders.py with the Python of an environment that has the loader installed
(``QTOOL_LOADER_PYTHON``); imports nothing of qtool. Usage:

    python loader_probe.py LOADER CHECKPOINT OUT.safetensors MODULE [MODULE ...] [--nll IDS.safetensors]

``LOADER``: ``transformers`` (``AutoModelForCausalLM.from_pretrained``) or ``gptqmodel``
(``GPTQModel.load``). For each ``MODULE`` (a full module name of a linear) it writes
``MODULE`` -> the effective weight ``[out, in]`` float32, read off the module's outputs on the
identity matrix (bias subtracted), whatever kernel the loader chose; and prints one JSON line
``{MODULE: class name}`` (with ``"nll"``: the mean next-token loss in nats of the model on the
windows ``ids [windows, tokens]`` of ``--nll``). Exit status 3 with the loader's message where it
refuses to load.
"""
import json
import sys

import torch
from safetensors.torch import save_file


def load(loader: str, path: str):
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16)
    if loader == "gptqmodel":
        from gptqmodel import GPTQModel

        return GPTQModel.load(path, device="cpu").model
    raise SystemExit(f"unknown loader {loader}")


def main() -> None:
    args = sys.argv[1:]
    ids_file = None
    if "--nll" in args:
        i = args.index("--nll")
        ids_file = args[i + 1]
        del args[i:i + 2]
    loader, path, out, *modules = args
    torch.manual_seed(0)
    try:
        model = load(loader, path)
    except Exception as e:  # the loader's refusal is the result
        print(json.dumps({"refused": f"{type(e).__name__}: {e}"}))
        sys.exit(3)
    weights, kinds = {}, {}
    with torch.no_grad():
        for name in modules:
            mod = model.get_submodule(name)
            in_f = getattr(mod, "in_features", None)
            dtype = next((t.dtype for t in [*mod.parameters(), *mod.buffers()] if t.is_floating_point()), torch.float16)
            eye = torch.eye(in_f, dtype=dtype)
            y = mod(eye).float()
            bias = getattr(mod, "bias", None)
            if bias is not None:
                y = y - bias.float()
            weights[name] = y.t().contiguous()
            kinds[name] = type(mod).__name__
        if ids_file:
            from safetensors.torch import load_file

            ids = load_file(ids_file)["ids"]
            losses = [model(ids[i:i + 1], labels=ids[i:i + 1]).loss.float().item() for i in range(ids.shape[0])]
            kinds["nll"] = sum(losses) / len(losses)
    save_file(weights, out)
    print(json.dumps(kinds))


if __name__ == "__main__":
    main()
