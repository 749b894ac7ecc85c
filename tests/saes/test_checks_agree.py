"""One table of good and bad SAE files, made with SAELens's and sparsify's own code and then
edited as files get broken; `pack inspect`, `pack inspect --verify`, `pack convert` and
`load_pack(...).sae(...)` must agree on every row: all accept, or all refuse."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

sae_lens = pytest.importorskip("sae_lens", reason="pip install -e '.[test]' installs sae-lens")
sparsify = pytest.importorskip("sparsify", reason="pip install -e '.[test]' installs eai-sparsify")

from saeflow import convert_pack, load_pack  # noqa: E402
from saeflow.cli.main import main  # noqa: E402
from saeflow.errors import SaeflowError  # noqa: E402

D_IN, D_SAE = 16, 64
HOOK = "blocks.1.hook_resid_post"


def _meta():
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=HOOK, model_name="tiny")


def _edit_tensors(folder, name="sae_weights.safetensors", **changes):
    f = folder / name
    t = load_file(f)
    for k, v in changes.items():
        t[k] = v(t[k])
    save_file(t, f)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _standard(folder):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=_meta())).save_model(folder)
    return folder


def _topk(folder):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=_meta())).save_model(folder)
    return folder


def _sparsify(folder, activation="topk", k=8):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    SparseCoder(D_IN, SparseCoderConfig(activation=activation, k=k, num_latents=D_SAE)) \
        .save_to_disk(folder)
    return folder


def _nan(where):
    def f(t):
        t = t.clone()
        t.view(-1)[3] = where
        return t
    return f


# Each row writes one SAE under ROOT and returns the folder to open (ROOT, or a pack).
def good_standard(root):
    _standard(root / "sae")


def good_mixed_float32_float64(root):
    _edit_tensors(_standard(root / "sae"), b_enc=lambda t: t.double(), b_dec=lambda t: t.double())


def good_bf16_jumprelu_training_save(root):
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, dtype="bfloat16", metadata=_meta())).save_model(root / "sae")


def good_fp32_batchtopk_checkpoint(root):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6.5,
                                                          metadata=_meta()))
    sae.update_topk_threshold(torch.rand(8, D_SAE) + 0.2)
    sae.save_model(root / "sae")


def good_sparsify(root):
    _sparsify(root / "layers.1")


def good_saeflow_pack(root):
    _standard(root / "src" / "sae")
    convert_pack(load_pack(root / "src"), root / "pack")
    return root / "pack"


def bad_nan_in_w_dec(root):
    _edit_tensors(_standard(root / "sae"), W_dec=_nan(float("nan")))


def bad_inf_in_b_enc(root):
    _edit_tensors(_standard(root / "sae"), b_enc=_nan(float("inf")))


def bad_nan_in_sparsify_encoder(root):
    _edit_tensors(_sparsify(root / "layers.1"), "sae.safetensors",
                  **{"encoder.weight": _nan(float("nan"))})


def bad_k_above_d_sae(root):
    _edit_cfg(_topk(root / "sae"), k=D_SAE + 1)


def bad_groupmax_k_not_dividing(root):
    _edit_cfg(_sparsify(root / "layers.1", "groupmax", k=8), k=5)


def bad_int8_encoder(root):
    _edit_tensors(_sparsify(root / "layers.1"), "sae.safetensors",
                  **{"encoder.weight": lambda t: (t * 100).to(torch.int8)})


def bad_cfg_dtype_contradicts_tensors(root):
    _edit_cfg(_standard(root / "sae"), dtype="bfloat16")


def bad_w_dec_shape(root):
    _edit_tensors(_standard(root / "sae"), W_dec=lambda t: t[:, :-1].contiguous())


def bad_b_enc_shape(root):
    _edit_tensors(_standard(root / "sae"), b_enc=lambda t: t[:-1].contiguous())


def bad_temporal(root):
    _edit_cfg(_standard(root / "sae"), architecture="temporal")


def bad_pack_edited_after_writing(root):
    pack = good_saeflow_pack(root)
    _edit_tensors(pack / "resid_post" / "layer_1", b_dec=lambda t: t + 1)
    return pack


ROWS = [good_standard, good_mixed_float32_float64, good_bf16_jumprelu_training_save,
        good_fp32_batchtopk_checkpoint, good_sparsify, good_saeflow_pack,
        bad_nan_in_w_dec, bad_inf_in_b_enc, bad_nan_in_sparsify_encoder, bad_k_above_d_sae,
        bad_groupmax_k_not_dividing, bad_int8_encoder, bad_cfg_dtype_contradicts_tensors,
        bad_w_dec_shape, bad_b_enc_shape, bad_temporal, bad_pack_edited_after_writing]
WHY = {"bad_nan_in_w_dec": "NaN", "bad_inf_in_b_enc": "NaN or Inf",
       "bad_nan_in_sparsify_encoder": "NaN", "bad_k_above_d_sae": "k=65 is not within",
       "bad_groupmax_k_not_dividing": "do not divide", "bad_int8_encoder": "int8",
       "bad_cfg_dtype_contradicts_tensors": "contradicts", "bad_w_dec_shape": "W_dec has shape",
       "bad_b_enc_shape": "b_enc has shape", "bad_temporal": "temporal SAEs",
       "bad_pack_edited_after_writing": "changed after the pack was written"}


def _loads(path) -> bool:
    try:
        pack = load_pack(path)
        for slot in pack.entries:
            pack.sae(*slot)
    except SaeflowError:
        return False
    return True


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.__name__)
def test_inspect_verify_convert_and_load_agree(tmp_path, row, capsys):
    root = tmp_path / "files"
    root.mkdir()
    path = row(root) or root
    good = row.__name__.startswith("good")
    verdicts = {
        "inspect": main(["pack", "inspect", str(path)]) == 0,
        "verify": main(["pack", "inspect", str(path), "--verify"]) == 0,
        "inspect --json": main(["pack", "inspect", str(path), "--json"]) == 0,
        "convert": main(["pack", "convert", str(path), str(tmp_path / "out")]) == 0,
        "load": _loads(path),
    }
    out = capsys.readouterr()
    assert verdicts == dict.fromkeys(verdicts, good), out
    if not good:
        assert "REFUSED" in out.out and WHY[row.__name__] in out.out, out.out
        assert not (tmp_path / "out").exists()  # convert wrote nothing
