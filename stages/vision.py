"""Vision stage: YOLO detection, BLIP captioning and CLIP image-caption similarity, batched, on one device.

One instance owns one copy of each enabled model on one device and is used by one thread (Ultralytics
predictors are not thread-safe). A micro-batch costs one YOLO predict, one BLIP ``generate`` and one CLIP
forward. ``torch``, ``transformers`` and ``ultralytics`` are imported in ``setup`` only, so importing this
module is cheap and works on machines that only run the synthetic stages.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

from PIL import Image

from stages.base import OVERLAP_DEPTH, BatchPolicy, ImageItem, OutOfDeviceMemory, Stage, is_out_of_memory, run_phases
from stages.devices import parse_device
from stages.devices import torch_device as torch_device_of
from stages.rules import signals_of, unneeded

logger = logging.getLogger(__name__)

FETCH_COMMAND = "binner fetch-weights"  # the CLI command that downloads the configured weights
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
_PROBE_HEADROOM = 0.9  # a probed batch may use at most this share of the memory available to the stage


@dataclass(frozen=True)
class DetectorOptions:
    """Ultralytics YOLO: a ``.pt`` file, an export (``.onnx``, ``.tflite``, ...) or a bare asset name."""

    weights: str
    confidence: float = 0.25
    image_size: int = 640


@dataclass(frozen=True)
class CaptionerOptions:
    """BLIP captioning: a Hugging Face model id (from the local cache) or a saved checkpoint folder."""

    model: str
    max_new_tokens: int = 30
    prompt: str | None = None


@dataclass(frozen=True)
class ClipOptions:
    """CLIP similarity between the image and its caption: model id (from the local cache) or folder."""

    model: str


class VisionConfigError(ValueError):
    """The vision options contradict each other; the message names the keys."""


class ModelUnavailableError(RuntimeError):
    """A configured model cannot be loaded from this machine; the message names the key and the fix."""


def resolve_dtype(precision: str, device: str) -> Any:
    """The torch dtype for ``vision.precision`` on ``device``: auto is fp16 on CUDA and fp32 on CPU.

    fp16 on CPU falls back to fp32 (half-precision kernels on CPU are slow or missing); bf16 is honoured
    on CPU, and on CUDA only where the GPU supports it.
    """
    import torch

    if precision not in PRECISIONS:
        raise VisionConfigError(f"vision.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    on_cuda = parse_device(device).is_cuda
    if precision == "fp32":
        return torch.float32
    if precision == "auto":
        return torch.float16 if on_cuda else torch.float32
    if precision == "fp16":
        if not on_cuda:
            logger.warning("vision.precision fp16 is not used on %s; running fp32 there", device)
            return torch.float32
        return torch.float16
    if on_cuda:
        with torch.cuda.device(torch.device(device)):
            if not torch.cuda.is_bf16_supported():
                raise VisionConfigError(f"vision.precision bf16 is not supported by {device}: use fp16 or auto")
    return torch.bfloat16


def _load_pretrained(loader: Any, name: str, key: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)`` from local files only; a missing model becomes a clear error."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as error:
        raise ModelUnavailableError(
            f"{key} = {name!r} cannot be loaded from this machine ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'not found'}). With internet, run `{FETCH_COMMAND}` "
            f"once to download it into the Hugging Face cache; offline, copy a saved checkpoint folder here and "
            f"set {key} to its path, or disable that model."
        ) from error


def _load_model_and_processor(model_class: Any, name: str, key: str, dtype: Any, device: Any) -> tuple[Any, Any]:
    """A transformers processor and its model in ``dtype`` on ``device``, ready for inference."""
    from transformers import AutoProcessor

    processor = _load_pretrained(AutoProcessor, name, key)
    model = _load_pretrained(model_class, name, key, dtype=dtype)
    return processor, model.to(device).eval()


def _load_captioner(model_class: Any, name: str, dtype: Any, device: Any) -> tuple[Any, Any, str]:
    """BLIP with the attention transformers gives it by default, and its name.

    transformers picks SDPA by default wherever a model implements it. BLIP does not, in any version this project has
    run (5.17 to 5.23): its vision encoder and its text decoder compute attention with their own matmul and softmax,
    and ``attn_implementation="sdpa"`` (or flash, or flex) is refused with a ValueError. So this is eager today, and
    SDPA without a code change the day transformers adds it.
    """
    from transformers import AutoProcessor

    processor = _load_pretrained(AutoProcessor, name, "vision.captioner.model")
    model = _load_pretrained(model_class, name, "vision.captioner.model", dtype=dtype)
    attention = str(getattr(model.config, "_attn_implementation", None) or "eager")
    return processor, model.to(device).eval(), attention


_reported_captioners: set[tuple[str, str, str, str]] = set()


def _report_captioner(name: str, attention: str, cache: str, dtype: Any) -> None:
    """Say once per process which attention and KV cache BLIP runs with (replicas would repeat it)."""
    key = (name, attention, cache, str(dtype))
    if key in _reported_captioners:
        return
    _reported_captioners.add(key)
    logger.info("BLIP %s runs with %s attention and a %s KV cache in %s (transformers has no SDPA path for BLIP; "
                "docs/benchmarks.md, GPU)", name, attention, cache, str(dtype).replace("torch.", ""))


@dataclass
class _VisionBatch:
    """A batch between ``prepare`` and ``forward``: the items with an image, their pixels on (or on their way to)
    the device, and what keeps the host side of an upload alive until it is done."""

    items: list[ImageItem]
    frames: list[Any]
    images: list[Any]
    ready: Any = None
    worst_case: bool = False


class VisionStage(Stage):
    """YOLO -> BLIP caption -> CLIP(image, caption) on a micro-batch; fills ``detections``, ``caption``,
    ``clip_similarity`` (a disabled model's key stays absent). Boxes are in ``item.image`` pixels.

    Only what an item lacks is computed: an item that already carries detections (``rebin --infer``) is not detected
    again, and one that carries a caption is not captioned again. The stage is the pipeline's last model stage: what
    its models may still write is all that can still come for an item's decision.
    """

    name = "vision"
    # BLIP's decoding is launch-bound: a step costs about the same at 32 images as at 256, so the probe starts high.
    max_auto_batch = 512
    # Batches whose frames a replica holds on the device at once: the overlap depth the engine drives it with (one on
    # the device, the others uploaded and waiting for it or still being finished). The memory probe holds as many.
    batches_in_flight = OVERLAP_DEPTH

    def __init__(
        self,
        detector: DetectorOptions | None,
        captioner: CaptionerOptions | None,
        clip: ClipOptions | None,
        precision: str,
        devices: list[str],
        batch_policy: BatchPolicy,
        max_image_side: int = 1600,
    ) -> None:
        """``max_image_side``: the longest side of the decoded images this stage gets (``limits.max_side``), which
        ``batch_size: auto`` probes with."""
        super().__init__(devices=devices, batch_policy=batch_policy)
        if clip is not None and captioner is None:
            raise VisionConfigError(
                "vision.clip is enabled but vision.captioner is disabled: CLIP compares the image with its "
                "caption, so enable vision.captioner or disable vision.clip"
            )
        if precision not in PRECISIONS:
            raise VisionConfigError(f"vision.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if detector is None and captioner is None:
            raise VisionConfigError("vision has no model enabled: enable vision.detector or vision.captioner")
        self.detector_options = detector
        self.captioner_options = captioner
        self.clip_options = clip
        # The signals of the enabled models only: routing and the rules take a disabled model's signal as never coming.
        self.produces = signals_of(model for model, options in (("detector", detector), ("captioner", captioner),
                                                                ("clip", clip)) if options is not None)
        self.precision = precision
        self.max_image_side = int(max_image_side)
        # BLIP's self-attention KV cache: "dynamic" (transformers' default) or "static" (preallocated, the same
        # captions; no fewer kernel launches without CUDA graphs, so it stays an option the GPU bench measures).
        self.blip_cache = "dynamic"
        self._clear_models()

    def _clear_models(self) -> None:
        self.torch_device: Any = None
        self.dtype: Any = None
        self.yolo: Any = None
        self._yolo_precision: dict[str, Any] = {}
        self.blip: Any = None
        self.blip_processor: Any = None
        self.clip: Any = None
        self.clip_processor: Any = None
        self._clip_max_tokens = 77
        self.direct: Any = None  # DirectDetector for .pt weights; exports keep the predictor
        self._blip_pixels: Any = None  # PixelValues for BLIP's processor (pre-processing on the device)
        self._clip_pixels: Any = None
        self._upload_stream: Any = None
        self.blip_attention = "eager"

    def replicate(self) -> VisionStage:
        clone = super().replicate()
        assert isinstance(clone, VisionStage)
        clone._clear_models()
        return clone

    # -- set-up -------------------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        from stages.torch_compat import ensure_torchvision
        from stages.ultralytics_env import prepare_ultralytics

        ensure_torchvision()
        torch_device = torch_device_of(device, "vision.devices")
        dtype = resolve_dtype(self.precision, device)
        self.torch_device, self.dtype = torch_device, dtype
        from stages.vision_inputs import PixelValues
        from stages.yolo_direct import DirectDetector

        if self.detector_options is not None:
            prepare_ultralytics()
            self.yolo = self._load_detector(self.detector_options)
            self._yolo_precision = self._detector_precision()
            if DirectDetector.supports(self.yolo):
                options = self.detector_options
                self.direct = DirectDetector(self.yolo, options.image_size, options.confidence, torch_device, dtype)
        if self.captioner_options is not None:
            from transformers import BlipForConditionalGeneration

            self.blip_processor, self.blip, self.blip_attention = _load_captioner(
                BlipForConditionalGeneration, self.captioner_options.model, dtype, torch_device)
            _report_captioner(self.captioner_options.model, self.blip_attention, self.blip_cache, dtype)
            self._blip_pixels = PixelValues(self.blip_processor)
        if self.clip_options is not None:
            from transformers import CLIPModel

            self.clip_processor, self.clip = _load_model_and_processor(
                CLIPModel, self.clip_options.model, "vision.clip.model", dtype, torch_device)
            self._clip_max_tokens = int(getattr(self.clip.config.text_config, "max_position_embeddings", 77))
            self._clip_pixels = PixelValues(self.clip_processor)
        if torch_device.type == "cuda":
            import torch

            self._upload_stream = torch.cuda.Stream(torch_device)
        super().setup(device)

    @staticmethod
    def _load_detector(options: DetectorOptions) -> Any:
        from stages.ultralytics_env import default_weights_dir, resolve_detector_weights

        path = resolve_detector_weights(options.weights)
        if path is None:
            raise ModelUnavailableError(
                f"vision.detector.weights = {options.weights!r} is not on this machine (looked at that path and in "
                f"{default_weights_dir()}). With internet, run `{FETCH_COMMAND}` once; offline, copy the file here "
                "and set vision.detector.weights to its path, or disable vision.detector."
            )
        from ultralytics import YOLO

        return YOLO(str(path), task="detect")

    def _detector_precision(self) -> dict[str, Any]:
        """fp16 for ``.pt`` weights on CUDA when the stage runs fp16 (Ultralytics has no bf16); exports
        (ONNX, TFLite, TensorRT, ...) keep the precision they were exported with."""
        import torch

        if self.torch_device.type != "cuda" or self.dtype != torch.float16:
            return {}
        from ultralytics.cfg import DEFAULT_CFG_DICT

        return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}  # 8.4 renamed half

    # -- inference ----------------------------------------------------------------------------------------

    def _upload(self, images: list[Any]) -> tuple[list[Any], Any]:
        """One copy of each decoded image to the device: uint8 HWC, through pinned memory with a non-blocking copy
        on the replica's upload stream (on the CPU, the array itself). Returns the frames and what ``forward``
        waits on before it uses them."""
        import numpy as np
        import torch

        arrays = [np.ascontiguousarray(image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB")
                                        if getattr(image, "mode", "RGB") != "RGB" else image)) for image in images]
        if self._upload_stream is None:
            return [torch.from_numpy(array) for array in arrays], None
        hosts = [torch.from_numpy(array).pin_memory() for array in arrays]
        with torch.cuda.stream(self._upload_stream):
            frames = [host.to(self.torch_device, non_blocking=True) for host in hosts]
            done = torch.cuda.Event()
            done.record(self._upload_stream)
        return frames, (done, hosts)

    def _frames_ready(self, batch: _VisionBatch) -> None:
        """On the model thread: the compute stream waits for the batch's uploads, and owns their memory from here."""
        if batch.ready is None:
            return
        import torch

        done, _hosts = batch.ready
        stream = torch.cuda.current_stream(self.torch_device)
        stream.wait_event(done)
        for frame in batch.frames:
            frame.record_stream(stream)

    def _detect(self, frames: list[Any], images: list[Any]) -> list[list[dict[str, Any]]]:
        """Detections per image: ``.pt`` weights run directly on the frames (letterbox, network, batched NMS and
        box scaling on the device, one copy back); exports go through Ultralytics' predictor."""
        if self.direct is not None:
            return self.direct.detect(frames)
        from stages.ultralytics_env import preserve_torch_threads

        options = self.detector_options
        assert options is not None and self.yolo is not None
        on_cuda = self.torch_device.type == "cuda"
        with preserve_torch_threads():
            results = self.yolo.predict(
                source=list(images),
                conf=options.confidence,
                imgsz=options.image_size,
                device=str(self.torch_device.index) if on_cuda else "cpu",
                verbose=False,
                **self._yolo_precision,
            )
        detections = []
        for result in results:
            boxes = result.boxes
            found = []
            if boxes is not None and len(boxes):
                for xyxy, conf, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
                    found.append({"label": str(result.names[int(cls)]), "confidence": float(conf),
                                  "box": [float(v) for v in xyxy]})
            detections.append(found)
        return detections

    def _caption(self, frames: list[Any], min_new_tokens: int | None = None) -> list[str]:
        output = self._generate(self._blip_inputs(frames), min_new_tokens)
        return [text.strip() for text in self.blip_processor.batch_decode(output, skip_special_tokens=True)]

    def _blip_inputs(self, frames: list[Any]) -> dict[str, Any]:
        """BLIP's ``generate`` inputs for ``frames`` on the device: pixel values, and the prompt's tokens if any."""
        options = self.captioner_options
        assert options is not None
        inputs: dict[str, Any] = {"pixel_values": self._blip_pixels(frames, self.torch_device, self.dtype)}
        if options.prompt:
            text = self.blip_processor.tokenizer([options.prompt] * len(frames), return_tensors="pt")
            inputs.update({key: text[key].to(self.torch_device) for key in ("input_ids", "attention_mask") if key in text})
        return inputs

    def _generate(self, inputs: dict[str, Any], min_new_tokens: int | None = None) -> Any:
        """BLIP's ``generate`` with the stage's options and KV cache (``blip_cache``): the tokens, prompt included."""
        options = self.captioner_options
        assert options is not None and self.blip is not None
        extra: dict[str, Any] = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
        if self.blip_cache == "static":
            # BLIP's generate drops the prompt's last token ([SEP]); without a prompt the decoder starts from [DEC]
            start = int(inputs["input_ids"].shape[1]) - 1 if "input_ids" in inputs else 1
            extra["past_key_values"] = self._static_cache(start + options.max_new_tokens)
        return self.blip.generate(**inputs, max_new_tokens=options.max_new_tokens, **extra)

    def _static_cache(self, length: int) -> Any:
        """A KV cache for one ``generate``: preallocated for ``length`` tokens in the decoder's self-attention, dynamic
        in its cross-attention. ``generate(cache_implementation="static")`` does not work for BLIP (it writes the
        577 image tokens of the cross-attention into the static cache: IndexError), this does."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

        config = self.blip.config.text_config
        return EncoderDecoderCache(StaticCache(config=config, max_cache_len=length), DynamicCache(config=config))

    def _similarity(self, frames: list[Any], captions: list[str]) -> list[float]:
        assert self.clip is not None
        import torch

        text = self.clip_processor.tokenizer(captions, return_tensors="pt", padding=True, truncation=True,
                                             max_length=self._clip_max_tokens)
        inputs = {key: value.to(self.torch_device) for key, value in text.items()}
        output = self.clip(pixel_values=self._clip_pixels(frames, self.torch_device, self.dtype), **inputs)
        image = torch.nn.functional.normalize(output.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(output.text_embeds.float(), dim=-1)
        return [float(value) for value in (image * text_embeds).sum(dim=-1).clamp(-1.0, 1.0).tolist()]

    def _infer(self, batch: _VisionBatch) -> list[dict[str, Any]]:
        """The signals computed now for each image of ``batch`` (keys of disabled models absent).

        Each model runs only on the images that lack its signal. An image whose bin its detections have settled under
        its item's rules (a confident detection decides A) is not captioned or scored: only the rest of the batch goes
        through BLIP and CLIP, and the item records what was not computed, and why. ``worst_case`` forces full-length
        captions (what a memory probe must measure).
        """
        import torch

        frames, known = batch.frames, batch.items
        carried: list[dict[str, Any]] = [item.signals for item in known] if known else [{} for _ in frames]
        signals: list[dict[str, Any]] = [{} for _ in frames]
        with torch.inference_mode():
            self._frames_ready(batch)
            if self.yolo is not None:
                lacking = [index for index, have in enumerate(carried) if "detections" not in have]
                if lacking:
                    found = self._detect([frames[index] for index in lacking], [batch.images[index] for index in lacking])
                    for index, detections in zip(lacking, found):
                        signals[index]["detections"] = detections
            if self.blip is not None:
                wanted = [index for index in range(len(frames))
                          if not known or self._caption_needed(known[index], signals[index])]
                minimum = self.captioner_options.max_new_tokens if batch.worst_case and self.captioner_options else None
                uncaptioned = [index for index in wanted if "caption" not in carried[index]]
                subset = [frames[index] for index in uncaptioned]
                captions = self._caption(subset, min_new_tokens=minimum) if subset else []
                for index, caption in zip(uncaptioned, captions):
                    signals[index]["caption"] = caption
                if self.clip is not None:
                    unscored = [index for index in wanted if "clip_similarity" not in carried[index]]
                    if unscored:
                        texts = [signals[index].get("caption", carried[index].get("caption", "")) for index in unscored]
                        scores = self._similarity([frames[index] for index in unscored], texts)
                        for index, similarity in zip(unscored, scores):
                            signals[index]["clip_similarity"] = similarity
        return signals

    def run_models(self, images: list[Any], worst_case: bool = False,
                   known: list[ImageItem] | None = None) -> list[dict[str, Any]]:
        """The three phases on one thread, for ``images`` (``known``: their items; see ``_infer``)."""
        frames, ready = self._upload(images)
        return self._infer(_VisionBatch(known or [], frames, images, ready, worst_case))

    def _caption_needed(self, item: ImageItem, found: dict[str, Any]) -> bool:
        """Whether the caption (and CLIP's score) can still change ``item``'s bin, once its detections are known."""
        if item.rules is None:
            return True
        produced = self.produces - {"detections"}
        merged = {**item.signals, **found}
        reason = unneeded(produced, merged, item.rules, frozenset())  # the last model stage: nothing comes after it
        if reason is None:
            return True
        for signal in sorted(produced - merged.keys()):
            item.not_computed[signal] = reason
        return False

    def _out_of_memory(self, error: BaseException, size: int) -> OutOfDeviceMemory:
        if self.torch_device is not None and self.torch_device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        return OutOfDeviceMemory(f"vision ran out of memory on {self.device} with a batch of {size}: {error}")

    # -- the three phases: host (upload), device (the models), host (signals onto the items) ---------------

    def prepare(self, items: list[ImageItem]) -> _VisionBatch:
        if self.device is None:
            raise RuntimeError("VisionStage.prepare() called before setup(device)")
        active = [item for item in items if item.failure is None and item.image is not None]
        images = [item.image for item in active]
        try:
            frames, ready = self._upload(images) if active else ([], None)
        except Exception as error:  # pinned memory is device-side memory too
            if is_out_of_memory(error):
                raise self._out_of_memory(error, len(active)) from error
            raise
        return _VisionBatch(active, frames, images, ready)

    def forward(self, batch: _VisionBatch) -> list[tuple[ImageItem, dict[str, Any]]]:
        if not batch.items:
            return []
        try:
            return list(zip(batch.items, self._infer(batch)))
        except OutOfDeviceMemory:
            raise
        except Exception as error:
            if is_out_of_memory(error):
                raise self._out_of_memory(error, len(batch.items)) from error
            raise

    def finish(self, items: list[ImageItem], outputs: list[tuple[ImageItem, dict[str, Any]]]) -> list[ImageItem]:
        for item, record in outputs:
            item.signals.update(record)
        return items

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        return run_phases(self, items)

    # -- lifecycle ----------------------------------------------------------------------------------------

    @staticmethod
    def _dummy_images(count: int) -> list[Image.Image]:
        return [Image.effect_noise((640, 480), 64).convert("RGB") for _ in range(count)]

    def warmup(self) -> None:
        if self.device is None:
            raise RuntimeError("VisionStage.warmup() called before setup(device)")
        self.run_models(self._dummy_images(1))

    def _probe_frame(self) -> Any:
        """The largest image the loader hands this stage: a ``max_image_side`` square (the most pixels under that
        longest side) of noise, uint8 RGB."""
        import numpy as np

        side = self.max_image_side
        return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)

    def _probe_attempt(self, size: int) -> None:
        """A batch of ``size`` at its worst as production meets it: ``batches_in_flight - 1`` batches of the largest
        frames uploaded and waiting on the device while one more goes through the models with full-length captions.
        Frames of one shape are also the worst case of the device pre-processing, which resamples a shape's frames as
        one stacked batch."""
        frames = [self._probe_frame()] * size
        waiting = [self._upload(frames) for _ in range(self.batches_in_flight - 1)]
        try:
            self.run_models(frames, worst_case=True)
        finally:
            del waiting

    def probe_batch_size(self, device: str, ceiling: int) -> int:
        """Largest batch (``ceiling``, halved until it fits) whose worst case (``_probe_attempt``: the batches in flight
        at ``max_image_side``, full-length captions) peaks under 90% of the memory available to this stage; CPU
        returns ``ceiling``."""
        if not parse_device(device).is_cuda:
            return ceiling
        import torch

        if self.device != device:
            self.setup(device)
        index = self.torch_device.index
        size = max(1, ceiling)
        try:
            while True:
                torch.cuda.empty_cache()
                free, _total = torch.cuda.mem_get_info(index)
                available = free + torch.cuda.memory_reserved(index)
                torch.cuda.reset_peak_memory_stats(index)
                try:
                    self._probe_attempt(size)
                    torch.cuda.synchronize(index)
                    fits = torch.cuda.max_memory_reserved(index) <= _PROBE_HEADROOM * available
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    fits = False
                if fits:
                    torch.cuda.empty_cache()
                    return size
                if size == 1:
                    torch.cuda.empty_cache()
                    raise OutOfDeviceMemory(
                        f"the vision models do not fit on {device} even with a batch of 1 (with {self.batches_in_flight} "
                        f"batches of {self.max_image_side}x{self.max_image_side} frames in flight): lower limits.max_side "
                        "or vision.precision, or give vision a GPU of its own")
                size //= 2
        finally:
            # The probe pinned up to ``batches_in_flight`` batches of the largest frames; the host allocator would keep
            # them page-locked for the process's life. Free blocks only (CUDA builds have it; the CPU build has no pinned cache).
            release_pinned = getattr(torch._C, "_host_emptyCache", None)
            if release_pinned is not None:
                release_pinned()

    def teardown(self) -> None:
        on_cuda = self.torch_device is not None and self.torch_device.type == "cuda"
        self._clear_models()
        self.device = None
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()
