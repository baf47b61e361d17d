"""GradientIndex: pass over a training corpus once, store every example's (compressed)
per-layer gradient on disk, then score any number of new queries against it without reading
the corpus again.

score(q, n) = ⟨(G + λI)⁻¹ ∇m_q, ∇L(z_n)⟩ as in `pairwise_scores`: the index stores the
training side, a query's side is computed when it is asked, and each score is one inner
product of a query vector with a stored row. See `compression` for what a row holds and
`storage` for the files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from .. import checks, distributed
from ..diagonal import Diagonal
from ..ekfac import EKFAC
from ..estimator import Estimator
from ..gradients import iter_layer_terms, num_examples, resolve_device
from ..identity import Identity
from ..io import atomic_path, atomic_save_safetensors, load_safetensors, weights_fingerprint
from ..kfac import KFAC, Workspace, eigenbasis_gradients
from ..layers import LayerInfo, layer_infos
from ..tables import topk_table
from ..tasks import Task
from . import storage
from .compression import (
    Compression,
    EigenCompression,
    LayerProjection,
    RandomCompression,
    check_compression,
    compression_config,
    compression_from_config,
    layer_projections,
    project,
    stored_shapes,
)

# The estimators whose preconditioning can be stored with an index (block-diagonal, with a
# saved state); CG and LiSSA solve against the training data at query time.
ESTIMATORS: dict[str, type[Estimator]] = {
    "EKFAC": EKFAC,
    "KFAC": KFAC,
    "Diagonal": Diagonal,
    "Identity": Identity,
}
SHARD_BYTES = 256 * 2**20  # default size of a shard
BLOCK_BYTES = 64 * 2**20  # default memory cap of a search: rows read at once


def _check_estimator(estimator: Any) -> Estimator:
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be an influence estimator, got {type(estimator).__name__}")
    if type(estimator).__name__ not in ESTIMATORS:
        raise ValueError(
            f"a GradientIndex stores its estimator's preconditioning for later queries, which "
            f"{type(estimator).__name__} cannot do (CG and LiSSA solve against the training "
            f"data at query time): use one of {list(ESTIMATORS)}"
        )
    return estimator


def estimator_digest(estimator: Estimator) -> str:
    """sha256 of an estimator's class, resolved damping and fitted state: which factors an
    index was built with."""
    h = hashlib.sha256(type(estimator).__name__.encode())
    h.update(json.dumps(estimator.damping_, sort_keys=True).encode())
    for key in sorted(estimator.state_):
        t = estimator.state_[key].detach().to("cpu", torch.float64).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def slice_data(data: Any, start: int, stop: int) -> Any:
    """Examples start:stop (dataset positions) of `data`, as data of the same kind."""
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                "GradientIndex.build needs map-style data (it is written in shards of "
                "consecutive examples, and a killed build resumes from them): pass a dataset "
                "or a DataLoader over one, not over an IterableDataset"
            )
        return DataLoader(
            Subset(data.dataset, range(start, stop)),
            batch_size=data.batch_size or 1,
            shuffle=False,
            collate_fn=data.collate_fn,
        )
    if isinstance(data, tuple) and all(torch.is_tensor(t) for t in data):
        return tuple(t[start:stop] for t in data)
    if isinstance(data, Mapping) and all(torch.is_tensor(t) for t in data.values()):
        return {k: v[start:stop] for k, v in data.items()}
    if hasattr(data, "select") and hasattr(data, "column_names"):  # Hugging Face datasets
        return data.select(range(start, stop))
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"GradientIndex.build needs indexable data, got {type(data).__name__}: pass a torch "
            "Dataset, a Hugging Face dataset, a dict or tuple of tensors, or a DataLoader over a "
            "map-style dataset"
        )
    return Subset(data, range(start, stop))


def _modules_by_name(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(
            f"the model has no layers {missing[:5]}, which the index was built on: open it with "
            "the model it was built from"
        )
    return {n: named[n] for n in names}


class GradientIndex:
    """A folder of stored training gradients, searched for new queries (see the module's
    docstring). Make one with `GradientIndex.build`, reopen it with `GradientIndex.open`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        # {layer: its shape, stored shape and offset in a row}, in the build's layer order.
        self.layout = {v["name"]: v for v in manifest["layers"]}
        self.layers = {
            n: LayerInfo(
                n,
                int(v["shape"][0]),
                int(v["shape"][1]) - int(v["bias"]),
                v["bias"],
                v["transposed"],
            )
            for n, v in self.layout.items()
        }
        self.compression: Compression = compression_from_config(manifest["compression"])
        self.dtype: torch.dtype = storage.DTYPES[manifest["dtype"]]
        self._projections: dict[str, LayerProjection] | None = None
        self._faiss: dict[Path, Any] = {}  # FAISS indexes opened so far, by file

    def __repr__(self) -> str:
        e = self.manifest["estimator"]
        return (
            f"GradientIndex({str(self.path)!r}: {self.num_examples} examples, "
            f"{len(self.layers)} layers, {e['class']}, compression {self.manifest['compression']}, "
            f"{self.manifest['dtype']}, {self.bytes_per_example} bytes per example)"
        )

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def row_size(self) -> int:
        """Numbers stored per example (all layers)."""
        return int(self.manifest["row_size"])

    @property
    def bytes_per_example(self) -> int:
        return self.row_size * torch.empty((), dtype=self.dtype).element_size()

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def shard_tensor(self, k: int) -> torch.Tensor:
        """Shard `k`'s rows [rows, D], memory-mapped (read-only use): nothing is read until
        touched."""
        s = self.shards[k]
        rows = s["stop"] - s["start"]
        flat = torch.from_file(
            str(self.path / s["file"]), shared=False, size=rows * self.row_size, dtype=self.dtype
        )
        return flat.view(rows, self.row_size)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        task: Task,
        estimator: Estimator,
        train_data: Any,
        path: str | Path,
        *,
        compression: Compression = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        shard_size: int | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> GradientIndex:
        """Pass over `train_data` once and write every example's gradient (true labels, the
        training loss), compressed by `compression`, under the folder `path`.

        `compression`: None (stored in full: scores equal `pairwise_scores`),
        `EigenCompression(k_s, k_a)` (K-FAC/EK-FAC only) or `RandomCompression(k_s, k_a)`.
        `dtype`: float32 (default), float16, bfloat16 or float64. `shard_size`: examples per
        shard (default: shards of about 256 MiB; under torchrun at most N / world size, so
        that every rank writes its own shards). A build that was killed resumes from its
        complete shards when called again with the same arguments (and the same data); a
        folder holding another index, or part of one, is an error. The manifest is written
        last: a folder without one is never read as an index."""
        return _build(
            model,
            task,
            estimator,
            train_data,
            Path(path),
            compression=compression,
            dtype=dtype,
            batch_size=batch_size,
            shard_size=shard_size,
            device=device,
            progress=progress,
        )

    # -- opening and checking ---------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        model: nn.Module | None = None,
        estimator: Estimator | None = None,
        verify: bool = False,
    ) -> GradientIndex:
        """Open the index at `path`. Every shard must exist with its recorded size; `verify`
        also checks their sha256 (reads the whole index). With `model` and `estimator`,
        checks that they are the ones it was built with (`check_model`, `check_estimator`)."""
        folder = Path(path)
        checks.boolean("verify", verify)
        manifest = storage.read_manifest(folder)
        for shard in manifest["shards"]:
            storage.check_shard(folder, shard, verify)
        needed = [storage.PROJECTIONS] if manifest["compression"]["kind"] != "none" else []
        if manifest["compression"]["kind"] != "eigen":
            needed.append(storage.ESTIMATOR)
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"index {folder}: {missing} missing; build the index again with the same arguments"
            )
        index = cls(folder, manifest)
        if model is not None:
            index.check_model(model)
        if estimator is not None:
            index.check_estimator(estimator)
        return index

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole index)."""
        for shard in self.shards:
            storage.check_shard(self.path, shard, verify=True)

    def check_model(self, model: nn.Module) -> None:
        """Raise when `model`'s layers or weights are not those the index was built from."""
        checks.check_model(model)
        modules = _modules_by_name(distributed.unwrap_model(model), list(self.layers))
        infos = layer_infos(modules)
        wrong = [
            f"{n}: index {self.layers[n].shape}, model {infos[n].shape}"
            for n in self.layers
            if infos[n].shape != self.layers[n].shape
        ]
        if wrong:
            raise ValueError(
                f"index {self.path} was built for other layer shapes: {'; '.join(wrong[:5])}. "
                "Open it with the model it was built from."
            )
        saved, now = self.manifest["model"]["fingerprint"], weights_fingerprint(modules)
        if saved != now:
            raise ValueError(
                f"index {self.path} was built from other weights than this model's (fingerprint "
                f"of the tracked layers {saved[:12]} saved, {now[:12]} now): its gradients "
                "belong to another model. Load the weights it was built from, or build an "
                "index for these."
            )

    def check_estimator(self, estimator: Estimator) -> None:
        """Raise, saying what differs, when `estimator` is not the one the index was built
        with: its class, its damping, or its fitted factors."""
        saved = self.manifest["estimator"]
        name = type(estimator).__name__
        if name != saved["class"]:
            raise ValueError(
                f"index {self.path} was built with {saved['class']}, not {name}: its query "
                f"preconditioning would differ. Use a {saved['class']}, or build another index."
            )
        setting = estimator.damping
        setting = dict(setting) if isinstance(setting, Mapping) else setting
        if setting != saved["damping"] or (
            not isinstance(setting, str) and estimator.damping_ != saved["damping_"]
        ):
            diff = {
                n: (saved["damping_"].get(n), estimator.damping_.get(n))
                for n in set(saved["damping_"]) | set(estimator.damping_)
                if saved["damping_"].get(n) != estimator.damping_.get(n)
            }
            raise ValueError(
                f"index {self.path} was built with another damping: damping="
                f"{saved['damping']!r} there, {setting!r} here (resolved per layer, index vs "
                f"given: {dict(sorted(diff.items())[:3])}). Use estimator.with_damping("
                f"{saved['damping']!r}), or build another index."
            )
        if estimator_digest(estimator) != saved["digest"]:
            raise ValueError(
                f"index {self.path} was built with {name} factors other than these (fitted on "
                "other data, labels, seed or weights; with damping='auto' their damping differs "
                "too). Use the estimator it was built with, or build another index."
            )

    # -- queries ----------------------------------------------------------------------------
    def _projection(self) -> dict[str, LayerProjection]:
        if self._projections is None:
            if self.compression is None:
                self._projections = {n: LayerProjection(None, None) for n in self.layers}
            else:
                tensors, _ = load_safetensors(self.path / storage.PROJECTIONS)
                self._projections = {
                    n: LayerProjection(
                        *(tensors.get(f"{n}::{f}") for f in ("p_s", "p_a", "scale", "u_s", "u_a"))
                    )
                    for n in self.layers
                }
        return self._projections

    def _estimator(self, model: nn.Module) -> Estimator:
        cls = ESTIMATORS[self.manifest["estimator"]["class"]]
        est = cls.load(self.path / storage.ESTIMATOR, model)
        if estimator_digest(est) != self.manifest["estimator"]["digest"]:
            raise ValueError(
                f"index {self.path}: {storage.ESTIMATOR} does not hold the factors the index was "
                "built with (modified or replaced); build the index again"
            )
        return est

    def _query_layers(self, model: nn.Module, task: Task) -> dict[str, nn.Module]:
        checks.check_task(task)
        self.check_model(model)
        layers = task.tracked_modules(distributed.unwrap_model(model))
        lacking = [n for n in layers if n not in self.layers]
        if lacking:
            raise ValueError(
                f"the task tracks layers {lacking[:5]} that index {self.path} does not hold (it "
                f"holds {list(self.layers)[:8]}{' …' if len(self.layers) > 8 else ''}): score "
                "with a task whose `modules=` are among the index's layers"
            )
        return layers

    def query_vectors(
        self,
        model: nn.Module,
        task: Task,
        queries: Any,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """[Q, D]: each query's preconditioned gradient in the index's stored form, so that
        its scores are its inner products with the stored rows (zeros for layers the task does
        not track: they add nothing)."""
        checks.check_score_args(batch_size=batch_size, device=device, progress=progress)
        checks.check_model(model)
        with checks.restore_model_on_error(model):
            return self._query_vectors(model, task, queries, batch_size, device, progress)

    def _query_vectors(self, model, task, queries, batch_size, device, progress) -> torch.Tensor:
        model = distributed.unwrap_model(model)
        layers = self._query_layers(model, task)
        offsets = {n: v["offset"] for n, v in self.layout.items()}
        sizes = {n: math.prod(v["stored"]) for n, v in self.layout.items()}
        dev = resolve_device(model, device)
        layer_vectors = self._query_map(model)
        parts, indices = [], []
        for idx, _, terms, _, _ in iter_layer_terms(
            model,
            task,
            queries,
            layers=layers,
            measurement=True,
            batch_size=batch_size,
            device=dev,
            progress=progress,
            desc="queries",
        ):
            a0 = next(iter(terms.values()))[0]
            x = a0.new_zeros(len(idx), self.row_size)
            for n, c in layer_vectors(terms).items():
                x[:, offsets[n] : offsets[n] + sizes[n]] = c.reshape(len(idx), -1)
            parts.append(x)
            indices.append(idx)
            del terms, a0
        if not parts:
            raise ValueError("query data is empty")
        # Back into the caller's order, one batch at a time and letting each go: a
        # concatenation and a reordered copy held three copies of all the vectors at once.
        x = parts[0].new_empty(sum(len(i) for i in indices), self.row_size)
        while parts:
            x[indices.pop().to(x.device)] = parts.pop()
        checks.check_finite_queries({"all layers": x})
        return x

    def _query_map(self, model: nn.Module):
        """A function from one batch's query terms {layer: (ā, g)} to {layer: its stored form
        of the preconditioned query gradients, [B, ...]}."""
        projections = self._projection()
        if isinstance(self.compression, EigenCompression):
            # Coefficients on the kept eigenvectors, divided by Λ + λ: EK-FAC's
            # preconditioning, diagonal in that basis. No estimator is loaded.
            def eigen(terms):
                out = {}
                for n, (a, g) in terms.items():
                    p = projections[n].to(a)
                    out[n] = project(a, g, p).mul_(p.scale)
                return out

            return eigen
        est = self._estimator(model)
        if isinstance(self.compression, RandomCompression) and isinstance(est, KFAC):
            # U_Sᵀ (Q_S Y Q_Aᵀ) U_A = (Q_Sᵀ U_S)ᵀ Y (Q_Aᵀ U_A), Y the preconditioned gradient in
            # the eigenbasis: the rotation back out of it, the query side's largest product,
            # is never made.
            sides = {}
            for n, p in projections.items():
                u = p.query_side()
                qs = est.state_[f"{n}::eigvecs_S"].to(u.p_s)
                qa = est.state_[f"{n}::eigvecs_A"].to(u.p_a)
                sides[n] = (qs.T @ u.p_s, qa.T @ u.p_a)

            def eigenbasis(terms):
                out, workspace = {}, Workspace()
                for n, (a, g) in terms.items():
                    qa, qs = est._bases(n, a)
                    # In place: the eigenbasis gradients are a workspace buffer, used up here.
                    y = eigenbasis_gradients(a, g, qa, qs, workspace, n)
                    y.mul_(est._inverse_eigenvalues(n, a))
                    v_s, v_a = (v.to(a) for v in sides[n])
                    out[n] = v_s.T @ y @ v_a
                return out

            return eigenbasis

        # As pairwise_scores preconditions its queries, then (random compression) projected.
        def dense(terms):
            out = {}
            for n, x in est.precondition_terms(terms).items():
                u = projections[n].query_side().to(x)
                out[n] = x if u.p_s is None else u.p_s.T @ x @ u.p_a
            return out

        return dense

    def _blocks(self, like: torch.Tensor, memory_cap: int):
        """Blocks of rows in `like`'s dtype and device. A converted block goes into one
        reused buffer (valid until the next block): a fresh copy per block kept the caller's
        previous block alive while the next was converted, two copies at once."""
        converted = None
        for start, rows in storage.iter_blocks(
            self.path, self.shards, self.bytes_per_example, self.dtype, memory_cap
        ):
            if rows.dtype == like.dtype and rows.device == like.device:
                yield start, rows
                continue
            if converted is None or len(converted) < len(rows):
                converted = None  # let the smaller buffer go before the larger one exists
                converted = torch.empty(rows.shape, dtype=like.dtype, device=like.device)
            view = converted[: len(rows)]
            view.copy_(rows)
            yield start, view

    def scores(
        self,
        model: nn.Module,
        task: Task,
        queries: Any,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        memory_cap: int = BLOCK_BYTES,
        progress: bool = False,
    ) -> torch.Tensor:
        """[Q, N] influence of every indexed training example on every query: equal to
        `pairwise_scores` with no compression (up to the stored dtype's rounding), an
        approximation of it otherwise. Shards are read in blocks of at most `memory_cap`
        bytes, multiplied on `device` (default: the model's) and let go; the result is on the
        CPU."""
        memory_cap = checks.positive_int("memory_cap", memory_cap)
        x = self.query_vectors(
            model, task, queries, batch_size=batch_size, device=device, progress=progress
        )
        out = torch.empty(len(x), self.num_examples, dtype=x.dtype)
        for start, rows in self._blocks(x, memory_cap):
            out[:, start : start + len(rows)] = (x @ rows.T).cpu()
        checks.check_finite_scores(out)
        return out

    def top_k(
        self,
        model: nn.Module,
        task: Task,
        queries: Any,
        k: int = 10,
        *,
        largest: bool = True,
        search: str = "exact",
        nlist: int | None = None,
        nprobe: int = 16,
        train_data: Any = None,
        query_data: Any = None,
        columns: list[str] | None = None,
        query_columns: list[str] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        memory_cap: int = BLOCK_BYTES,
        progress: bool = False,
    ):
        """The `k` most influential indexed examples per query, as the DataFrame of
        `influence.top_influences` (same columns; `train_data`/`query_data` add their text).

        `search="exact"` keeps each query's running top `k` over blocks of the shards (no
        [Q, N] matrix); `search="faiss"` asks an inverted-file FAISS index (built on first
        use and stored beside the shards, see `faiss_index`) probing `nprobe` of its lists:
        approximate, much faster on large indexes (needs `pip install faiss-cpu`); `nlist`
        picks the FAISS index (default √N lists)."""
        k = checks.positive_int("k", k)
        checks.boolean("largest", largest)
        memory_cap = checks.positive_int("memory_cap", memory_cap)
        if search not in ("exact", "faiss"):
            raise ValueError(f"search must be 'exact' or 'faiss', got {search!r}")
        x = self.query_vectors(
            model, task, queries, batch_size=batch_size, device=device, progress=progress
        )
        k = min(k, self.num_examples)
        if search == "faiss":
            values, idx = self._faiss_search(x if largest else -x, k, nlist, nprobe)
            values = values if largest else -values
        else:
            values = x.new_empty(len(x), 0)
            idx = torch.empty(len(x), 0, dtype=torch.long, device=x.device)
            for start, rows in self._blocks(x, memory_cap):
                s = x @ rows.T
                values = torch.cat([values, s], dim=1)
                idx = torch.cat(
                    [
                        idx,
                        torch.arange(start, start + len(rows), device=x.device).expand(len(x), -1),
                    ],
                    dim=1,
                )
                values, pos = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
                idx = idx.gather(1, pos)
        return topk_table(
            values,
            idx,
            num_train=self.num_examples,
            train_data=train_data,
            query_data=query_data,
            columns=columns,
            query_columns=query_columns,
        )

    # -- approximate search -----------------------------------------------------------------
    def faiss_index(self, nlist: int | None = None, *, seed: int = 0):
        """An inverted-file FAISS index of the stored rows for inner-product search, with
        `nlist` lists (default √N) trained by k-means on a seeded sample of
        max(40·nlist, 10,000) rows: `IndexIVFFlat` (float32 rows) for a float32 or float64
        index, `IndexIVFScalarQuantizer` (float16 rows) for a 16-bit one. Built once, saved
        beside the shards under a name keyed by their checksums, and kept open. It holds every
        row in memory (the index's size, or twice it for float32 from float64), unlike exact
        search."""
        try:
            import faiss
        except ImportError:  # pragma: no cover - the extra is installed in the tests
            raise ImportError(
                "search='faiss' needs FAISS: pip install faiss-cpu (or "
                "pip install 'influence[index]')"
            ) from None
        n = self.num_examples
        nlist = checks.positive_int("nlist", nlist, allow_none=True) or max(1, round(n**0.5))
        nlist = min(nlist, n)
        content = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()
        path = self.path / f"faiss-ivf{nlist}-seed{seed}-{content[:16]}.index"
        if path in self._faiss:
            return self._faiss[path]
        if path.exists():
            self._faiss[path] = faiss.read_index(str(path))
            return self._faiss[path]
        gen = torch.Generator().manual_seed(seed)
        wanted = torch.randperm(n, generator=gen)[: min(n, max(40 * nlist, 10_000))].sort().values
        like = torch.empty(0, dtype=torch.float32)
        sample = []
        for start, rows in self._blocks(like, BLOCK_BYTES):
            pick = wanted[(wanted >= start) & (wanted < start + len(rows))] - start
            sample.append(rows[pick].clone())
        d, ip = self.row_size, faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatIP(d)
        if self.dtype in (torch.float16, torch.bfloat16):
            fp16 = faiss.ScalarQuantizer.QT_fp16
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, fp16, ip)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        ivf.cp.seed = seed
        ivf.train(torch.cat(sample).numpy())
        del sample
        for _, rows in self._blocks(like, BLOCK_BYTES):
            ivf.add(rows.numpy())
        with atomic_path(path) as tmp:
            faiss.write_index(ivf, str(tmp))
        self._faiss[path] = ivf
        return ivf

    def _faiss_search(self, x: torch.Tensor, k: int, nlist: int | None, nprobe: int):
        nprobe = checks.positive_int("nprobe", nprobe)
        ivf = self.faiss_index(nlist)
        ivf.nprobe = nprobe
        values, idx = ivf.search(x.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(values).to(x.dtype), torch.from_numpy(idx)


# -- the build ------------------------------------------------------------------------------


def _layout(shapes: dict[str, tuple[int, int]], infos: dict[str, LayerInfo]) -> dict[str, dict]:
    layers, offset = {}, 0
    for n, (r, c) in shapes.items():
        info = infos[n]
        layers[n] = {
            "name": n,
            "shape": list(info.shape),
            "bias": info.bias,
            "transposed": info.transposed,
            "stored": [r, c],
            "offset": offset,
        }
        offset += r * c
    return layers


def _save_projections(folder: Path, projections: dict[str, LayerProjection]) -> None:
    tensors = {}
    for n, p in projections.items():
        if p.p_s is None:
            continue
        for f in ("p_s", "p_a", "scale", "u_s", "u_a"):
            if getattr(p, f) is not None:
                tensors[f"{n}::{f}"] = getattr(p, f)
    if tensors:
        atomic_save_safetensors(tensors, folder / storage.PROJECTIONS)


def _shard_rows(
    model, task, layers, projections, layout, data, rows, row_size, dtype, batch_size, device, bar
) -> torch.Tensor:
    """One shard's [rows, D] in the storage dtype, on the CPU, in the caller's order."""
    out = torch.empty(rows, row_size, dtype=dtype)
    cast: dict[tuple, dict[str, LayerProjection]] = {}
    for idx, _, terms, _, _ in iter_layer_terms(
        model, task, data, layers=layers, batch_size=batch_size, device=device, desc="index"
    ):
        a0 = next(iter(terms.values()))[0]
        key = (a0.dtype, a0.device)
        if key not in cast:
            cast[key] = {n: p.to(a0) for n, p in projections.items()}
        for n, (a, g) in terms.items():
            off, (r, c) = layout[n]["offset"], layout[n]["stored"]
            out[idx, off : off + r * c] = (
                project(a, g, cast[key][n]).reshape(len(idx), -1).to("cpu", dtype)
            )
        bar.update(len(idx))
        del terms, a0
    return out


@checks.restores_model
def _build(
    model,
    task,
    estimator,
    train_data,
    folder: Path,
    *,
    compression,
    dtype,
    batch_size,
    shard_size,
    device,
    progress,
) -> GradientIndex:
    model = distributed.unwrap_model(model)
    checks.check_task(task)
    estimator = _check_estimator(estimator)
    compression = check_compression(compression)
    if isinstance(compression, EigenCompression) and not isinstance(estimator, KFAC):
        raise ValueError(
            f"EigenCompression keeps coefficients in the Kronecker eigenbases of K-FAC/EK-FAC; "
            f"{type(estimator).__name__} has none. Use RandomCompression or compression=None."
        )
    dtype = storage.DTYPES[storage.dtype_name(dtype)]
    batch_size = checks.positive_int("batch_size", batch_size)
    shard_size = checks.positive_int("shard_size", shard_size, allow_none=True)
    checks.check_device(device)
    checks.boolean("progress", progress)
    layers = task.tracked_modules(model)
    infos = layer_infos(layers)
    estimator.check_fitted(infos)
    fingerprint = weights_fingerprint(layers)
    if estimator.fingerprint_ is not None and estimator.fingerprint_ != fingerprint:
        raise ValueError(
            "the estimator was fitted on other weights than this model's tracked layers "
            f"(fingerprint {estimator.fingerprint_[:12]} fitted, {fingerprint[:12]} now): an "
            "index must pair one model's gradients with its own curvature. Fit it on this model."
        )
    layout = _layout(stored_shapes(compression, infos), infos)
    projections = layer_projections(compression, estimator, infos)
    n = num_examples(train_data, batch_size)
    if n == 0:
        raise ValueError("train_data is empty")
    row_size = sum(math.prod(v["stored"]) for v in layout.values())
    row_bytes = row_size * torch.empty((), dtype=dtype).element_size()
    rank, world = distributed.world()
    manifest = {
        "format": storage.FORMAT,
        "version": storage.VERSION,
        "model": {"fingerprint": fingerprint},
        "estimator": {
            "class": type(estimator).__name__,
            "damping": estimator.damping
            if not isinstance(estimator.damping, Mapping)
            else dict(estimator.damping),
            "damping_": dict(estimator.damping_),
            "digest": estimator_digest(estimator),
        },
        "compression": compression_config(compression),
        "dtype": storage.dtype_name(dtype),
        "layers": list(layout.values()),
        "row_size": row_size,
        "num_examples": n,
    }
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    manifest["key"] = key
    if _check_folder(folder, key):
        try:
            return GradientIndex.open(folder, verify=True)  # built already, and intact
        except (FileNotFoundError, ValueError):
            pass  # damaged shards: built again below, the intact ones kept
    distributed.all_gather_objects(None)  # every rank has looked before rank 0 changes it
    per_shard = _rows_per_shard(folder, shard_size, row_bytes, n, world)
    manifest["rows_per_shard"] = per_shard
    num_shards = math.ceil(n / per_shard)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / storage.MANIFEST).unlink(missing_ok=True)  # rebuilding damaged shards
        _save_projections(folder, projections)
        if compression is None or isinstance(compression, RandomCompression):
            estimator.save(folder / storage.ESTIMATOR)
    else:
        folder.mkdir(parents=True, exist_ok=True)
    mine = range(rank, num_shards, world)
    records = {}
    todo = []
    for k in mine:
        rec = storage.complete_shard(folder, k, key)
        if rec is not None:
            records[k] = rec
        else:
            todo.append(k)
    dev = resolve_device(model, device)
    total = sum(min(n, (k + 1) * per_shard) - k * per_shard for k in todo)
    with tqdm(total=total, desc="index", disable=not progress, leave=False) as bar:
        for k in todo:
            start, stop = k * per_shard, min(n, (k + 1) * per_shard)
            rows = _shard_rows(
                model,
                task,
                layers,
                projections,
                layout,
                slice_data(train_data, start, stop),
                stop - start,
                row_size,
                dtype,
                batch_size,
                dev,
                bar,
            )
            records[k] = storage.write_shard(
                folder,
                k,
                rows,
                {
                    "key": key,
                    "start": start,
                    "stop": stop,
                    "rows_per_shard": per_shard,
                    "rank": rank,
                },
            )
            del rows
    shares = distributed.all_gather_objects(records)
    merged = {k: r for share in shares for k, r in share.items()}
    manifest["shards"] = [
        {f: merged[k][f] for f in ("file", "start", "stop", "bytes", "sha256")}
        for k in range(num_shards)
    ]
    if rank == 0:
        storage.write_manifest(folder, manifest)
    distributed.all_gather_objects(None)  # every rank waits for the manifest
    return GradientIndex.open(folder)


def _check_folder(folder: Path, key: str) -> bool:
    """Whether `folder` holds a finished index of this build. A folder holding another index,
    or part of another build, is an error: it is never overwritten."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder for a gradient index")
    if (folder / storage.MANIFEST).exists():
        saved = storage.read_manifest(folder)
        if saved.get("key") != key:
            raise FileExistsError(
                f"{folder} holds a gradient index built with other settings (model, estimator, "
                "compression, dtype, layers or number of examples): pass another path, or "
                "delete it first"
            )
    for record in folder.glob("shard-*.json"):
        saved = storage.read_record(folder, int(record.stem.split("-")[1]))
        if saved is not None and saved.get("key") != key:
            raise FileExistsError(
                f"{folder} holds part of a build with other settings ({record.name}): pass "
                "another path, or delete it first"
            )
    return (folder / storage.MANIFEST).exists()


def _rows_per_shard(folder: Path, shard_size, row_bytes: int, n: int, world: int) -> int:
    """Examples per shard: an unfinished build's own (so that it resumes whatever the world
    size), else `shard_size`, else about SHARD_BYTES and at most N / world size."""
    for record in sorted(folder.glob("shard-*.json")) if folder.exists() else []:
        saved = storage.read_record(folder, int(record.stem.split("-")[1]))
        if saved is not None:
            if shard_size is not None and shard_size != saved["rows_per_shard"]:
                raise ValueError(
                    f"{folder} holds an unfinished build with shard_size="
                    f"{saved['rows_per_shard']}: resume it with that size, or delete the folder"
                )
            return int(saved["rows_per_shard"])
    if shard_size is not None:
        return shard_size
    return max(1, min(SHARD_BYTES // row_bytes, math.ceil(n / world)))
