"""Issue 9, item 3: the layering of the docs is true in the imports, and each constant of the MXFP4
rule has one definition.

numerics (framework-free) <- kernels <- mxfp4 (the op/dispatch layer) <- megatron / export /
metrics / layouts <- parity / cli; tools (the CLIs' shared infrastructure) under layouts and
export, above numerics only. Checked on the source (AST, tests/_helpers.imports), so a lazy import
inside a function counts too.
"""

import ast
import re

import pytest

from _helpers import PKG, imports, require

LAYERS = {  # package -> the megatron_qat packages it must not import
    "numerics": {"kernels", "mxfp4", "megatron", "export", "metrics", "layouts", "parity", "cli", "tools"},
    "kernels": {"mxfp4", "megatron", "export", "metrics", "layouts", "parity", "cli", "tools"},
    "mxfp4": {"megatron", "export", "metrics", "layouts", "parity", "cli", "tools"},
    # the CLIs' shared infrastructure (errors, signals, atomic outputs, progress, safetensors reader)
    "tools": {"kernels", "mxfp4", "megatron", "export", "metrics", "layouts", "parity", "cli"},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_upward_imports(layer):
    bad = []
    for path in sorted((PKG / layer).glob("*.py")):
        for target, _, _ in imports(path):
            if target in LAYERS[layer]:
                bad.append(f"{path.relative_to(PKG)} imports megatron_qat.{target}")
    assert not bad, bad


@pytest.mark.parametrize("layer", ["kernels", "mxfp4", "megatron", "export", "parity", "tools"])
def test_no_private_names_imported_from_a_lower_layer(layer):
    bad = []
    for path in sorted((PKG / layer).glob("*.py")):
        for target, names, _ in imports(path):
            if target != layer and any(n.startswith("_") and n != "__future__" for n in names):
                bad.append(f"{path.relative_to(PKG)}: from megatron_qat.{target} import {names}")
    assert not bad, bad


def test_constants_module_imports_nothing():
    assert not list(imports(PKG / "numerics" / "constants.py"))


def _sources():
    return {p.relative_to(PKG).as_posix(): p.read_text() for p in PKG.rglob("*.py")}


def _int_literals(src: str) -> set[int]:
    return {n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant) and type(n.value) is int}


@pytest.mark.parametrize(
    "values, allowed",
    [
        # RN(1/6); parity/golden.py is the deliberately independent NumPy model (imports only numpy)
        ({0x3E2AAAAB}, {"numerics/constants.py", "parity/golden.py"}),
        ({0x7FC0, 0x7E00, 0x7FC00000}, {"numerics/constants.py"}),  # canonical NaN bits
    ],
)
def test_each_bit_constant_is_written_once(values, allowed):
    found = {name for name, src in _sources().items() if values & _int_literals(src)}
    assert found <= allowed, sorted(found - allowed)


@pytest.mark.parametrize(
    "pattern, allowed",
    [
        (r"torch\.bfloat16:\s*torch\.int16", {"numerics/format.py"}),  # the integer-view map
        # the block size; parity/golden.py (the independent model) has its own
        (r"^\s*(DEFAULT_)?BLOCK(_SIZE)?\s*=\s*32\b", {"numerics/constants.py", "parity/golden.py"}),
    ],
)
def test_each_constant_has_one_definition(pattern, allowed):
    found = {name for name, src in _sources().items() if re.search(pattern, src, flags=re.M)}
    assert found <= allowed, sorted(found - allowed)


def test_config_reads_the_block_size_from_numerics():
    from megatron_qat import config
    from megatron_qat.numerics import constants

    assert config.DEFAULT_BLOCK_SIZE == constants.DEFAULT_BLOCK_SIZE == 32
    assert not re.search(r"^DEFAULT_BLOCK_SIZE\s*=", (PKG / "config.py").read_text(), flags=re.M)


def test_rcp_six_is_decoded_once_without_torch():
    import struct

    import torch

    from megatron_qat.numerics import format as fmt

    assert fmt.RCP_SIX == struct.unpack("<f", struct.pack("<I", 0x3E2AAAAB))[0]
    assert fmt.RCP_SIX == torch.tensor(fmt.RCP_SIX_BITS, dtype=torch.int32).view(torch.float32).item()
    src = (PKG / "numerics" / "reference.py").read_text()
    assert ".item()" not in src and "def rcp_six" not in src


def test_kernel_constexprs_derive_from_the_one_definition():
    require("triton", "the triton extra is not installed")
    from megatron_qat.kernels import qdq_jit
    from megatron_qat.numerics import constants

    assert qdq_jit.RCP_SIX_BITS.value == constants.RCP_SIX_BITS
    assert (qdq_jit.NAN_BF16.value, qdq_jit.NAN_FP16.value, qdq_jit.NAN_FP32.value) == (
        constants.NAN_BITS_BF16,
        constants.NAN_BITS_FP16,
        constants.NAN_BITS_FP32,
    )


def test_one_adversarial_input_generator():
    assert not (PKG / "parity" / "synthetic.py").exists()
    assert not (PKG / "mxfp4" / "families.py").exists()
    assert "numerics.families import synthetic_tensors" in (PKG / "parity" / "sources.py").read_text()
