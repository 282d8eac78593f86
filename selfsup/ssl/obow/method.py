"""OBoW (Gidaris et al., CVPR 2021) as a Lightning method: an EMA teacher turns the full image into a
bag of visual words per level (vocabularies filled online from the teacher's own feature maps); the
student predicts those bags from small crops through a head generated from the vocabulary.

One step, in the order (and with the step numbers) of docs/methods/obow.md:
  2. snapshot the vocabularies (the student predicts against the words *before* this step's enqueue)
  3. student forward on each crop group (pooled final features, not normalised)
  4. teacher EMA update with α(step) (parameters only), before the targets are computed: the base
     does it for `teachers()` before the step's forward, which gives the same teacher (the
     student's forward changes no parameter)
  5-6. teacher forward (train mode, batch statistics) -> per level: μ update, soft codes, BoW targets,
       then enqueue one locally averaged vector per image (gathered over ranks)
  7-8. generated weights -> logits -> Σ_groups mean_levels KL(target || prediction)
Only `backbone` (the student) is exported; the teacher, the vocabularies and the generators are
registered state, checkpointed and restored with the module.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data import views
from selfsup.core.errors import UserError
from selfsup.ssl.base import PretextOutput, SSLMethod
from selfsup.ssl.obow.head import WeightGenerator, bow_logits
from selfsup.ssl.obow.loss import code_statistics, obow_loss, squared_distances
from selfsup.ssl.obow.vocabulary import Vocabulary
from selfsup.ssl.pictures import captioned_grid, denormalize


class OBoW(SSLMethod):
    name = "obow"

    @classmethod
    def check_config(cls, cfg, backbone) -> None:
        """The levels' teacher maps, the student's views and the queue against the global batch."""
        from selfsup.core.config_checks import configured_ranks

        m, size = cfg.method, int(cfg.data.image_size)
        levels = stage_levels(m.levels, len(backbone.stage_channels))
        check_level_maps(backbone, size, levels, int(m.border))
        check_student_views(backbone, m.views)
        ranks = configured_ranks(cfg.trainer)
        if ranks is not None:
            check_queue(m.num_words, cfg.data.batch_size * ranks)

    def __init__(self, cfg, num_classes: int | None = None):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        backbone = self.backbone
        self.levels = stage_levels(m.levels, len(backbone.stage_channels))
        self.teacher = copy.deepcopy(backbone)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.vocabularies = nn.ModuleList(
            Vocabulary(m.num_words, backbone.stage_channels[i], m.inv_delta, border=m.border,
                       local_kernel=m.local_kernel, scale_momentum=m.scale_momentum)
            for i in self.levels)
        self.generators = nn.ModuleList(WeightGenerator(backbone.stage_channels[i], backbone.num_features)
                                        for i in self.levels)
        self.level_names = [f"stage{i + 1}" for i in self.levels]
        t = self.cfg.trainer
        ranks = t.devices * t.num_nodes if isinstance(t.devices, int) and isinstance(t.num_nodes, int) else 1
        check_queue(m.num_words, self.cfg.data.batch_size * ranks)  # before anything runs; again at fit start

    def on_fit_start(self) -> None:
        super().on_fit_start()
        check_queue(self.cfg.method.num_words, self.global_batch() // self.trainer.accumulate_grad_batches)

    def teachers(self) -> list[tuple[nn.Module, nn.Module]]:
        """The EMA teacher of the backbone; α(step) is the base's schedule: cosine from
        `method.teacher_momentum` to 1.0 over the run."""
        return [(self.backbone, self.teacher)]

    def train_view(self):
        d, v = self.cfg.data, self.cfg.method.views
        return views.multi_crop_view(
            d.mean, d.std, teacher_size=d.image_size, teacher_resize=v.teacher_resize,
            num_crops=v.num_crops, crop_size=v.crop_size, crop_scale=tuple(v.crop_scale),
            num_patches=v.num_patches, patch_image_size=v.patch_image_size, patch_size=v.patch_size,
            patch_jitter=v.patch_jitter, patch_scale=tuple(v.patch_scale), blur_p=v.blur_p)

    def skips_weight_decay(self, name, param, declared) -> bool:
        # the official recipe decays every trainable parameter (norms, biases, generators included)
        return False if self.cfg.method.decay_everything else super().skips_weight_decay(name, param, declared)

    # ---- the step ---------------------------------------------------------------------------
    def _location_generator(self) -> torch.Generator:
        """Queue locations drawn from (seed, step, rank) alone: a resumed run draws what an
        uninterrupted run would (the global RNG is not in the checkpoint)."""
        seed = (int(self.cfg.seed) * 1_000_003 + int(self.global_step)) * 4099 + int(self.global_rank)
        return torch.Generator().manual_seed(seed % (2**63 - 1))

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self._trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self._trainer.world_size == 1:
            return x
        return self.all_gather(x).mean()

    @torch.no_grad()
    def _targets_then_enqueue(self, maps: list[torch.Tensor], words: list[torch.Tensor]):
        """Per level: μ update, soft codes against the pre-step words, BoW; then the queue update.
        In fp32 even under bf16 autocast (||F||² + ||V||² - 2<F, V> cancels badly in bf16)."""
        generator = self._location_generator()
        targets, codes = [], []
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            for vocab, fmap, w in zip(self.vocabularies, maps, words, strict=True):
                reduce = self._mean_over_ranks if self.training else None
                bow, code = vocab.targets(fmap, w, update_scale_with=reduce)
                targets.append(bow)
                codes.append(code)
                if self.training:
                    vocab.enqueue(self._gather_rows(vocab.local_vectors(fmap, generator)))
        return targets, codes

    def pretext_step(self, batch: dict) -> PretextOutput:
        m = self.cfg.method
        # 2. the vocabularies before this step's enqueue
        words = [v.words.clone() for v in self.vocabularies]
        # 3. student: one forward per crop group (image-major flattening, [B, n, C, H, W] -> [B n, ...])
        groups = [batch[k] for k in ("crops", "patches") if k in batch and batch[k].shape[1] > 0]
        features = [self.backbone(g.flatten(0, 1)) for g in groups]
        # 4. the teacher is this step's EMA already (the base's training_step, before this forward)
        # 5-6. teacher maps -> targets (μ updated first), then the queue update
        with torch.no_grad():
            stages = self.teacher.forward_stages(batch["image"])
            maps = [stages[i].float() for i in self.levels]
            targets, codes = self._targets_then_enqueue(maps, words)
            teacher_features = self.teacher.pool(stages[-1]).float()
        # 7-8. generated weights from the snapshot, logits, loss
        weights = [gen(w) for gen, w in zip(self.generators, words, strict=True)]
        logits = [[bow_logits(f, w, m.kappa) for w in weights] for f in features]
        loss, per_level = obow_loss(logits, targets, [g.shape[1] for g in groups])
        terms = {}
        for name, value, code, vocab in zip(self.level_names, per_level, codes, self.vocabularies, strict=True):
            perplexity, usage = code_statistics(code)
            terms[f"loss_{name}"] = value.detach()
            terms[f"perplexity_{name}"] = perplexity
            terms[f"word_usage_{name}"] = usage
            terms[f"distance_scale_{name}"] = vocab.scale.detach().clone()
        return {"loss": loss, "terms": terms, "features": teacher_features,
                "pictures": {"maps": [fm.detach() for fm in maps], "targets": targets}}

    # ---- pictures: image patches nearest to a few visual words ------------------------------
    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        level = min(int(self.cfg.method.picture_level), len(self.levels) - 1)
        grid = nearest_patches_picture(batch["image"], out["pictures"]["maps"][level], self.vocabularies[level],
                                       self.cfg.data.mean, self.cfg.data.std)
        if grid is not None:
            self.logger.experiment.add_image(f"obow/words_{self.level_names[level]}_nearest_patches", grid,
                                             self.global_step, dataformats="HWC")


def stage_levels(levels, n_stages: int) -> list[int]:
    """`method.levels` (stage indices, negative from the end) as stage numbers 0 .. n_stages - 1."""
    for i in levels:
        if not -n_stages <= int(i) < n_stages:
            raise UserError(f"obow: method.levels={list(levels)}: the backbone has {n_stages} stages "
                            f"(use indices {-n_stages} .. {n_stages - 1})")
    chosen = [int(i) % n_stages for i in levels]
    if not chosen or len(set(chosen)) != len(chosen):
        raise UserError(f"obow: method.levels={list(levels)}: name one or more different stages, e.g. [-2, -1]")
    return chosen


def check_level_maps(backbone, image_size: int, levels: list[int], border: int) -> None:
    """The teacher codes each level's map less `border` on each side: something must be left."""
    if border < 0:
        raise UserError(f"obow: method.border={border}: must be 0 or more")

    def coded_side(sizes, level):  # the side of the part of the level's map that is coded
        return min(sizes[level]) - 2 * border

    def all_coded(sizes):
        return all(coded_side(sizes, level) >= 1 for level in levels)

    sizes = backbone.stage_sizes(image_size)
    for level in levels:
        if coded_side(sizes, level) < 1:
            h, w = sizes[level]
            raise UserError(f"obow: data.image_size={image_size} gives {backbone.name}'s stage {level + 1} a {h}x{w} map, "
                            f"nothing left once method.border={border} is cropped from each side: use "
                            f"image_size={backbone.min_image_size(all_coded)} or more, or method.border=0")


def check_student_views(backbone, v) -> None:
    """The student's crops (and patches) go through the backbone too, and the patches are cut from
    a jittered 3x3 grid (selfsup/data/views.py, patch_grid)."""
    sizes = [("method.views.crop_size", v.crop_size)]
    if v.num_patches:
        sizes.append(("method.views.patch_size", v.patch_size))
    for key, px in sizes:
        if px < 1 or backbone.stage_sizes(px) is None:
            raise UserError(f"obow: {key}={px} is too small for {backbone.name}: use {backbone.min_image_size()} px or more")
    if not 0 <= v.num_patches <= 9:
        raise UserError(f"obow: method.views.num_patches={v.num_patches}: must be 0 .. 9 (patches of a 3x3 grid)")
    if v.num_patches and v.patch_image_size < v.patch_size + v.patch_jitter:
        raise UserError(f"obow: method.views.patch_image_size={v.patch_image_size} cannot hold a {v.patch_size} px patch "
                        f"with {v.patch_jitter} px of jitter: use patch_image_size={v.patch_size + v.patch_jitter} or more")


def check_queue(num_words: int, global_batch: int) -> None:
    """Each step enqueues one vector per image of the global batch: K must be a multiple of it."""
    if num_words % global_batch:
        multiple = -(-num_words // global_batch) * global_batch
        raise UserError(f"obow: method.num_words={num_words} is not a multiple of the global batch ({global_batch} "
                        f"images per step): the queue would not wrap around cleanly; use method.num_words={multiple}, "
                        f"or a global batch (data.batch_size x ranks) that divides {num_words}")


def nearest_patches_picture(images: torch.Tensor, fmap: torch.Tensor, vocab: Vocabulary, mean, std,
                            words: int = 8, per_word: int = 8):
    """A grid: one row per visual word (the words nearest to most locations of this batch), holding
    the image patches whose teacher features are nearest to that word, nearest first."""
    from selfsup.ssl.obow.loss import crop_border

    cropped = crop_border(fmap, vocab.border)
    d = squared_distances(cropped, vocab.words)  # [B, K, h, w]
    b, k, h, w = d.shape
    counts = torch.bincount(d.argmin(1).flatten(), minlength=k)
    chosen = counts.argsort(descending=True)[:words]
    chosen = chosen[counts[chosen] > 0]
    if len(chosen) == 0:
        return None
    size = images.shape[-1]
    stride = max(1, size // fmap.shape[-1])
    half = max(stride, size // 8)
    padded = F.pad(images, (half, half, half, half))
    tiles, captions = [], []
    for word in chosen.tolist():
        flat = d[:, word].flatten()
        for index in flat.argsort()[:per_word].tolist():
            img, rest = divmod(index, h * w)
            i, j = divmod(rest, w)
            cy = (i + vocab.border) * stride + stride // 2 + half
            cx = (j + vocab.border) * stride + stride // 2 + half
            tiles.append(padded[img, :, cy - half:cy + half, cx - half:cx + half])
            captions.append(f"w{word}")
    tiles = denormalize(torch.stack(tiles), mean, std)
    return captioned_grid(tiles, captions, columns=per_word, scale=max(1, 48 // (2 * half)))
