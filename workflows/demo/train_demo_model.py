"""Train the small demo UNet shipped in this folder (about 80 s on 2 CPU cores here: the shipped weights, bit for bit).

Image: ``RGB.byte.tif``, a Landsat 7 ETM+ RGB scene of Andros, Bahamas, at 300 m,
from rasterio's test data (BSD licence, see LICENSE-rasterio.txt).

Labels are derived from the visible bands, per pixel, with two rules:

* ``cloud``: bright in all three bands, ``min(R, G, B) > 90``;
* ``land``: not cloud and red at least as bright as blue, ``R >= B``
  (vegetation and soil reflect more red than blue; water absorbs red);
* ``water``: every other valid pixel.

Nodata pixels (0 in all bands) are left out of the loss.  The network learns the
rules from 64 x 64 crops; the point of the demo is a model whose masks mean
something, not a state-of-the-art classifier.

    python workflows/demo/train_demo_model.py   # writes landsat_water_land_cloud.pt
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from monai.networks.nets import UNet

HERE = Path(__file__).resolve().parent
ARGS = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
MEAN, STD = [25.0, 40.0, 45.0], [20.0, 20.0, 25.0]  # also in demo_landsat.yaml
IGNORE = 255


def rule_labels(image: np.ndarray) -> np.ndarray:
    r, g, b = image.astype(np.int16)
    labels = np.zeros(r.shape, np.int64)  # water
    labels[r >= b] = 1  # land
    labels[image.min(axis=0) > 90] = 2  # cloud
    labels[image.max(axis=0) == 0] = IGNORE  # nodata
    return labels


def main(steps: int = 600, crop: int = 64, batch: int = 16, seed: int = 0) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with rasterio.open(HERE / "RGB.byte.tif") as ds:
        image = ds.read()
    labels = rule_labels(image)
    x = (image.astype(np.float32) - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    net = UNet(**ARGS)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    height, width = labels.shape
    for step in range(steps):
        rows = rng.integers(0, height - crop, batch)
        cols = rng.integers(0, width - crop, batch)
        xb = torch.from_numpy(np.stack([x[:, r : r + crop, c : c + crop] for r, c in zip(rows, cols)]))
        yb = torch.from_numpy(np.stack([labels[r : r + crop, c : c + crop] for r, c in zip(rows, cols)]))
        loss = loss_fn(net(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    net.eval()
    with torch.inference_mode():
        predicted = net(torch.from_numpy(x[None, :, :704, :784])).argmax(1)[0].numpy()
    truth = labels[:704, :784]
    valid = truth != IGNORE
    print(f"pixel accuracy against the rules: {(predicted[valid] == truth[valid]).mean():.3f}")
    torch.save(net.state_dict(), HERE / "landsat_water_land_cloud.pt")


if __name__ == "__main__":
    main()
