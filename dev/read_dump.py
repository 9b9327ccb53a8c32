"""Read and print a UniPool reference dump (dev/SPEC.md section 6).

    /usr/bin/python3 dev/read_dump.py FILE.bin [...]

prints the header, the hparams, the per-step stats and, for the sigmoid router,
the final expert bias, and checks that the file size is exactly what the
header implies. load_dump() is the reader that
make_dumps.py and check_dumps.py share.
"""
import sys

import numpy as np

from magic import magic
from model import Config, num_params

MAGIC = magic("DUMP_MAGIC")
VERSION = magic("DUMP_VERSION")
HEADER_INTS = 256
HPARAM_FLOATS = 64
HEADER_FIELDS = ["magic", "version", "V", "Vp", "maxT", "L", "C", "NH", "NKV", "F", "G", "E",
                 "K", "router", "aux", "B", "T", "n_micro", "n_steps"]
HPARAM_FIELDS = ["norm_eps", "rope_theta", "alpha", "router_c", "router_eps", "lr", "b1", "b2",
                 "eps", "wd", "grad_clip", "bias_rate"]
# The sections after header and hparams, in file order, with their dtypes; "bias" only with
# the sigmoid router (router 2).
SECTIONS = [("params", "<f4"), ("tokens", "<i4"), ("logits", "<f4"), ("stats", "<f4"),
            ("grads", "<f4"), ("final", "<f4"), ("bias", "<f4")]


def config_from(header, hparams):
    """The model Config of a dump's header and hparams dicts."""
    model_fields = {k: header[k] for k in ["V", "Vp", "maxT", "L", "C", "NH", "NKV", "F", "G",
                                           "E", "K", "router", "aux"]}
    return Config(**model_fields, **{k: float(hparams[k]) for k in
                                     ["alpha", "norm_eps", "rope_theta", "router_c", "router_eps",
                                      "bias_rate"]})


def section_sizes(header):
    """Element count of each section of SECTIONS that the file holds."""
    h = header
    P = num_params(config_from(h, {k: 0.0 for k in HPARAM_FIELDS}))
    sizes = {"params": P,
             "tokens": h["n_steps"] * h["n_micro"] * h["B"] * (h["T"] + 1),
             "logits": h["B"] * h["T"] * h["V"],
             "stats": h["n_steps"] * 3,
             "grads": P,
             "final": P}
    if h["router"] == 2:
        sizes["bias"] = h["L"] * h["E"]
    return sizes


def parse_head(data, path):
    """The header and hparams of a dump's bytes: (header, hparams, header_raw, hparams_raw)."""
    head_bytes = 4 * (HEADER_INTS + HPARAM_FLOATS)
    if len(data) < head_bytes:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than header and hparams")
    header_raw = np.frombuffer(data, "<i4", HEADER_INTS)
    hparams_raw = np.frombuffer(data, "<f4", HPARAM_FLOATS, 4 * HEADER_INTS)
    if header_raw[0] != MAGIC or header_raw[1] != VERSION:
        raise ValueError(f"{path}: bad magic/version {header_raw[0]} {header_raw[1]}")
    if header_raw[len(HEADER_FIELDS):].any() or hparams_raw[len(HPARAM_FIELDS):].any():
        raise ValueError(f"{path}: unused header or hparams entries are not 0")
    header = {name: int(v) for name, v in zip(HEADER_FIELDS, header_raw)}
    hparams = {name: float(v) for name, v in zip(HPARAM_FIELDS, hparams_raw)}
    if header["router"] != 2 and hparams["bias_rate"] != 0:
        raise ValueError(f"{path}: bias_rate {hparams['bias_rate']} without the sigmoid router")
    return header, hparams, header_raw, hparams_raw


def load_dump(path):
    """Parse a dump into a dict: 'header' and 'hparams' (name -> value), 'header_raw' (int32[256]),
    'hparams_raw' (float32[64]) and one array per section the file holds ("bias" with the
    sigmoid router only). Raises ValueError on a bad file."""
    with open(path, "rb") as f:
        data = f.read()
    header, hparams, header_raw, hparams_raw = parse_head(data, path)
    sizes = section_sizes(header)
    offset = 4 * (HEADER_INTS + HPARAM_FLOATS)
    expected = offset + 4 * sum(sizes.values())
    if len(data) != expected:
        raise ValueError(f"{path}: size {len(data)} bytes, header implies {expected}")
    dump = {"header": header, "hparams": hparams, "header_raw": header_raw,
            "hparams_raw": hparams_raw}
    for name, dtype in SECTIONS:
        if name in sizes:
            dump[name] = np.frombuffer(data, dtype, sizes[name], offset)
            offset += 4 * sizes[name]
    return dump


def describe(path):
    """Print one dump; False if it is not a valid dump."""
    try:
        with open(path, "rb") as f:
            header, hparams, _, _ = parse_head(f.read(), path)
        print(f"{path}:")
        print("  header: " + " ".join(f"{k}={v}" for k, v in header.items()))
        print("  hparams: " + " ".join(f"{k}={v:.9g}" for k, v in hparams.items()))
        d = load_dump(path)
    except (OSError, ValueError) as e:
        print(f"  FAIL {e}")
        return False
    print(f"  size ok, {len(d['params'])} parameters")
    for step, (ce, aux, norm) in enumerate(d["stats"].reshape(-1, 3)):
        print(f"  step {step}: ce {ce:.9g} aux {aux:.9g} grad_norm {norm:.9g}")
    if "bias" in d:
        bias = d["bias"]
        print(f"  final bias: {np.count_nonzero(bias)} of {bias.size} non-zero, "
              f"range [{bias.min():.9g}, {bias.max():.9g}]")
    return True


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    results = [describe(p) for p in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
