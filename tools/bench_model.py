"""The same recipe in PyTorch: EfficientNet-Lite0 (the reference package's model) → GeM → BN →
Linear 512 → ArcFace, inference and AdamW training-step images/s, channels-last and contiguous;
and onnxruntime inference of the embedding network when onnxruntime is installed. One JSON line
per implementation, for tools/bench_model.sh."""
import argparse, json, math, time, warnings

warnings.filterwarnings("ignore")
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet


class GeM(nn.Module):
    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class ArcFace(nn.Module):
    def __init__(self, d, n, s=30.0, m=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d))
        nn.init.xavier_uniform_(self.weight)
        self.s, self.cos_m, self.sin_m = s, math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def forward(self, x, label):
        cosine = F.linear(F.normalize(x), F.normalize(self.weight))
        sine = torch.sqrt((1.0 - cosine**2).clamp(0, 1))
        phi = cosine * self.cos_m - sine * self.sin_m
        phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(label, cosine.size(1)).float()
        return (one_hot * phi + (1.0 - one_hot) * cosine) * self.s


class Model(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.pooling = GeM()
        self.neck = nn.Sequential(nn.BatchNorm1d(1280), nn.Linear(1280, 512))
        self.fc = ArcFace(512, classes)

    def embed(self, x):
        return self.neck(self.pooling(self.model.extract_features(x)))


def rate(fn, steps, batch):
    fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * batch / (time.perf_counter() - t)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--steps", type=int, default=5)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = 1000
    for layout in ["channels_last", "contiguous"]:
        m = Model(classes)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m = m.to(memory_format=fmt)
        x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
        y = torch.randint(0, classes, (args.batch,))
        m.eval()
        with torch.no_grad():
            infer = rate(lambda: F.normalize(m.embed(x)), args.steps, args.batch)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-4)

        def step():
            opt.zero_grad()
            F.cross_entropy(m.fc(m.embed(x), y), y).backward()
            opt.step()

        train = rate(step, args.steps, args.batch)
        print(json.dumps({"impl": f"PyTorch {torch.__version__.split('+')[0]} ({layout})", "size": args.size,
                          "batch": args.batch, "threads": args.threads,
                          "inference_img_s": round(infer, 2), "train_img_s": round(train, 2)}))
    try:
        import onnxruntime as ort
    except ImportError:
        return
    import io
    m = Model(classes).eval()
    buf = io.BytesIO()

    class Embed(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return F.normalize(self.m.embed(x))

    x = torch.randn(args.batch, 3, args.size, args.size)
    torch.onnx.export(Embed(m), x, buf, input_names=["x"], output_names=["e"], dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    infer = rate(lambda: sess.run(None, {"x": xn}), args.steps, args.batch)
    print(json.dumps({"impl": f"onnxruntime {ort.__version__}", "size": args.size, "batch": args.batch,
                      "threads": args.threads, "inference_img_s": round(infer, 2), "train_img_s": None}))


if __name__ == "__main__":
    main()
