"""convfactor compress --fit data (issue 22): factors fitted to the responses on built-in training-photo crops,
layer by layer; closer to the original on photos it never saw than the weight fit at the same ranks."""
import torch

from convfactor import io, models
from convfactor.cli import main
from convfactor.data.images import builtin_images
from convfactor.data.sr import calibration_crops


def _compress(tmp_path, name, *extra):
    out = tmp_path / name
    args = ["compress", "edsr_baseline_x2", "--input-size", "1x3x24x24", "--method", "channel_svd", "--rank", "6",
            "--op-names", "body.0.*", "body.1.*", "-o", str(out), *extra]
    assert main(args) == 0
    return io.load(out, models.get("edsr_baseline_x2", pretrained=True))


def test_fit_data_is_closer_to_the_original_on_held_out_photos(tmp_path, capsys):
    original = models.get("edsr_baseline_x2", pretrained=True).eval()
    weights = _compress(tmp_path, "weights")
    data = _compress(tmp_path, "data", "--fit", "data", "--calibration-crops", "3")
    held = torch.cat([torch.from_numpy(c) for c in calibration_crops(builtin_images("test"), 2, 32, limit=3)])
    with torch.no_grad():
        want = original(held)
        err = {k: float((m.eval()(held) - want).norm() / want.norm()) for k, m in (("weights", weights), ("data", data))}
    assert err["data"] < err["weights"]
    assert not any(torch.equal(a, b) for a, b in zip(weights.state_dict().values(), data.state_dict().values())
                   if a.dim() == 4 and a.shape[0] == 6)     # the fitted factors differ


def test_fit_data_refuses_a_non_image_input(tmp_path, capsys):
    rc = main(["compress", "resnet20", "--input-size", "1x3", "--method", "channel_svd", "--rank", "4", "--fit", "data",
               "-o", str(tmp_path / "x")])
    assert rc == 2 and not (tmp_path / "x").exists()
