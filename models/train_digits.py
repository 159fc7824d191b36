#!/usr/bin/env python3
"""Train the two small digits ResNets shipped in models/ and export them to ONNX.

scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes; no
download) is split 80/20 (stratified, seed 0).  Both models have the same
torchvision-style architecture (module names conv1/bn1/relu/layer1.0/...):

    conv3x3 1->16 + BN + act
    layer1.0: BasicBlock 16->16            (identity skip)
    layer2.0: BasicBlock 16->32, stride 2  (1x1 conv + BN projection)
    GlobalAveragePool, Flatten, Linear 32->10

``digits_relu`` uses ReLU; ``digits_poly`` uses the degree-2 polynomial
activation 0.125 x^2 + 0.5 x + 0.25 (fixed coefficients, the same as the
*_poly reference models), so it runs under HE exactly as trained.

Writes (all small):

    models/digits_relu.onnx, models/digits_poly.onnx   opset 17, torch.onnx.export, eval mode
    models/digits_test_x.npy  [360,1,8,8] float32      the test split (pixels / 8 - 1)
    models/digits_test_y.npy  [360] int64              its labels
    models/digits_calib_x.npy [200,1,8,8] float32      calibration inputs, from the training split
    models/digits_calib_y.npy [200] int64              their labels

and prints the plaintext test accuracy of both ONNX files in onnxruntime.
Needs torch and scikit-learn (``pip install -e '.[train]'``, or any venv with
torch, scikit-learn, onnx and onnxruntime); nothing in the test suite does.

    python models/train_digits.py --out models
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np

POLY = (0.125, 0.5, 0.25)
N_CALIB = 200


def load_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def build(act: str):
    import torch
    from torch import nn

    class Poly2(nn.Module):
        def forward(self, x):
            a, b, c = POLY
            return a * x * x + b * x + c

    def make_act():
        return nn.ReLU(inplace=False) if act == "relu" else Poly2()

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = make_act()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            idt = x if self.downsample is None else self.downsample(x)
            return self.relu(out + idt)

    class DigitsResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = make_act()
            self.layer1 = nn.Sequential(BasicBlock(16, 16, 1))
            self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return DigitsResNet()


def train(act: str, xtr, ytr, epochs: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = build(act)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if act == "relu" else 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            # augmentation: random shifts by up to one pixel (background value -1 fills)
            sh = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=sh, dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        sched.step()
    model.eval()
    return model


def export(model, path: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), buf, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamo=False)
    return buf.getvalue()


def ort_accuracy(data: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    pred = [int(np.argmax(sess.run(None, {"input": x[i:i + 1]})[0])) for i in range(len(x))]
    return float(np.mean(np.asarray(pred) == y))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, xte, ytr, yte = load_split(args.seed)
    rng = np.random.default_rng(args.seed)
    cal = np.sort(rng.choice(len(xtr), N_CALIB, replace=False))
    _write(out / "digits_test_x.npy", _npy(np.ascontiguousarray(xte, np.float32)))
    _write(out / "digits_test_y.npy", _npy(yte.astype(np.int64)))
    _write(out / "digits_calib_x.npy", _npy(np.ascontiguousarray(xtr[cal], np.float32)))
    _write(out / "digits_calib_y.npy", _npy(ytr[cal].astype(np.int64)))
    for act in ("relu", "poly"):
        model = train(act, xtr, ytr, args.epochs, args.seed)
        data = export(model, out / f"digits_{act}.onnx")
        _write(out / f"digits_{act}.onnx", data)
        acc = ort_accuracy(data, xte, yte)
        print(f"digits_{act}.onnx: {len(data)} bytes, plaintext test accuracy (onnxruntime, {len(yte)} images): "
              f"{acc * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
