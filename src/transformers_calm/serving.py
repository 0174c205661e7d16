"""`calm serve`: transformers' OpenAI-compatible server (`transformers serve`) for a CALM.

`transformers serve` cannot load a CALM by itself: its model manager instantiates `getattr(transformers,
config.architectures[0])`, which exists only for transformers' own architectures (not for a checkpoint's remote
code, nor for a model registered with the Auto classes by a package), and it has no plug-in point. So this module
builds the same server from transformers' own pieces (`transformers.cli.serving`: `ModelManager`, `GenerationState`,
`GenerateManager`, the chat-completions, completions and responses handlers, `build_server`, uvicorn), and changes
only what CALM needs:

- the model is loaded with `AutoModelForCausalLM` (this package registers CALM), the tokenizer with `AutoTokenizer`,
  with a plain chat template when it has none (a base CALM continues the conversation's text);
- CALM's sampler options come through the request (`num_candidates`, `exact_temperature`, `max_draws`: top-level
  fields, the OpenAI client's `extra_body`) or transformers' `generation_config` field (a JSON string);
- what CALM cannot apply (options that act on or return next-token logits) is refused before generation starts,
  with CALM's reason, as an HTTP 400 (`CalmRequestError`), for streamed requests too;
- `seed` seeds a `torch.Generator` of the request instead of the process's global RNG (requests queue behind each
  other, so a global seed would be consumed by the request running before);
- the server's default length (1024 new tokens) is clamped to the model's context;
- continuous batching (`--continuous_batching`) falls back to `generate`: transformers' runner samples every token
  from next-token logits over a paged per-token KV cache, and CALM has neither (it samples chunks of K tokens).
"""

import asyncio
import copy
import json

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
from transformers.utils.import_utils import is_serve_available

# transformers' serving package (`transformers.cli.serving`) is internal and changes between releases: 5.10's
# handlers, streamer and app factory take other arguments, and 5.25 rewrote it around a model process (EngineClient,
# GenerateRunner). This module is built on 5.24's.
SERVE_EXTRA = "transformers[serving]>=5.24,<5.25"  # fastapi, uvicorn, openai, pydantic, starlette, rich
SUPPORTED = (Version("5.24"), Version("5.25"))


def _check_transformers() -> None:
    version = Version(transformers.__version__)
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise ImportError(
            f"calm serve is built on transformers 5.24's server, and this is transformers {transformers.__version__} "
            f"(5.25 rewrote its serving internals): pip install '{SERVE_EXTRA}'"
        )
    if not is_serve_available():
        raise ImportError(f"calm serve needs transformers' serving dependencies: pip install '{SERVE_EXTRA}'")


_check_transformers()

from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: E402
from transformers.cli.serving.completion import CompletionHandler  # noqa: E402
from transformers.cli.serving.model_manager import ModelManager  # noqa: E402
from transformers.cli.serving.response import ResponseHandler  # noqa: E402
from transformers.cli.serving.utils import (  # noqa: E402
    DirectStreamer,
    GenerateManager,
    GenerationState,
    _GenerationCancelled,
    _StreamError,
    split_revision,
)

from .configuration_calm import CalmConfig  # noqa: E402
from .generation_configuration_calm import UNSUPPORTED_OPTIONS, CalmGenerationConfig  # noqa: E402
from .modeling_calm import CalmForCausalLM  # noqa: E402
from .official_checkpoints import is_official_calm  # noqa: E402

logger = logging.get_logger(__name__)

# CALM's sampler options, accepted as top-level request fields (the OpenAI client's `extra_body`).
CALM_OPTIONS = ("num_candidates", "exact_temperature", "max_draws")
# The request fields that set the length; without one, the server's default (1024) is clamped to the context.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "generation_config")

_NO_PROBABILITIES = "CALM's head samples chunks without a likelihood, so there are no token probabilities to return"
# OpenAI request fields that act on or return next-token logits: refused (with why) unless inactive. transformers'
# server would map some to logits processors (which CALM's generate refuses, reason included) and ignore the others.
REFUSED_FIELDS = {
    "logprobs": (lambda v: v in (None, False, 0), _NO_PROBABILITIES),
    "top_logprobs": (lambda v: v in (None, 0), _NO_PROBABILITIES),
    "best_of": (lambda v: v in (None, 1), f"best_of ranks samples by their likelihood; {_NO_PROBABILITIES}"),
    "frequency_penalty": (lambda v: not v, UNSUPPORTED_OPTIONS["repetition_penalty"]),
    "presence_penalty": (lambda v: not v, UNSUPPORTED_OPTIONS["repetition_penalty"]),
    "logit_bias": (lambda v: not v, UNSUPPORTED_OPTIONS["sequence_bias"]),
}

# For a tokenizer without one: the messages' text, one after the other (a base language model continues it).
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"
)


class CalmRequestError(ValueError):
    """A request CALM cannot serve (an option it cannot apply, a prompt longer than its context): an HTTP 400 with
    the reason, in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_generate_request(model, inputs: dict, generation_config, tokenizer=None) -> None:
    """Run `generate`'s preparation (generation config, prompt, lengths and stopping criteria; no forward pass) on a
    request, so that what `generate` would refuse is refused before a response, streamed or not, starts.

    Raises:
        `CalmRequestError`: with `generate`'s reason.
    """
    try:
        config, model_kwargs, defaults = model._prepare_calm_generation_config(
            copy.deepcopy(generation_config), dict(inputs)
        )
        prompt = model._prepare_calm_prompt(None, config, model_kwargs)
        model._prepare_calm_stopping(config, prompt, None, tokenizer, defaults)
    except ValueError as error:
        raise CalmRequestError(str(error)) from error


class CalmModelManager(ModelManager):
    """transformers' `ModelManager`, loading a CALM with `AutoModelForCausalLM` (transformers' own resolves the class
    by name in `transformers`, where CALM is not) and its tokenizer with a chat template."""

    def __init__(self, *args, chat_template: str | None = None, **kwargs):
        self.chat_template = chat_template
        super().__init__(*args, **kwargs)

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        model_id, revision = split_revision(model_id_and_revision)
        options = {"revision": revision, "trust_remote_code": self.trust_remote_code}
        if is_official_calm(model_id, revision=revision):  # AutoTokenizer would read its config: no model_type
            options["config"] = CalmConfig.from_pretrained(model_id, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(model_id, **options)
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        elif tokenizer.chat_template is None:
            logger.warning(f"{model_id}'s tokenizer has no chat template: chat requests join the messages' text.")
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return tokenizer

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        model_id, revision = split_revision(model_id_and_revision)
        options = {"revision": revision, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation is not None:
            options["attn_implementation"] = self.attn_implementation
        model_class = CalmForCausalLM if is_official_calm(model_id, revision=revision) else AutoModelForCausalLM
        model = model_class.from_pretrained(model_id, **options)
        if not hasattr(model, "_prepare_calm_generation_config"):
            raise ValueError(f"{model_id} is a {type(model).__name__}, not a CALM: serve it with `transformers serve`.")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return model.to(device).eval()


def pad_prompt_at_end(inputs: dict, patch_size: int, pad_token_id: int | None) -> dict:
    """The request's prompt right-padded with the pad token to whole chunks of K, the pads read as tokens (attention
    1): how `transformers_calm.sft` trains prompts (`generate` would fill it at its start, masked)."""
    if pad_token_id is None:
        raise CalmRequestError("--pad_prompts_at_end needs the model's pad_token_id (its generation config has none).")
    fill = -inputs["input_ids"].shape[-1] % patch_size
    if not fill:
        return inputs
    input_ids = inputs["input_ids"]
    padded = {
        **inputs,
        "input_ids": torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], fill), pad_token_id)], -1),
    }
    if inputs.get("attention_mask") is not None:
        mask = inputs["attention_mask"]
        padded["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], fill))], -1)
    return padded


class CalmGenerateManager(GenerateManager):
    """transformers' `GenerateManager` (`model.generate` on one inference thread, requests in turn), which checks a
    request before it starts (`check_generate_request`), draws from the request's own seeded generator and reports
    an error raised during a streamed generation as a well-formed SSE error event."""

    def __init__(self, pad_prompts_at_end: bool = False):
        super().__init__()
        self.pad_prompts_at_end = pad_prompts_at_end

    def _prepare(self, model, processor, inputs, gen_config) -> dict:
        request = gen_config.__dict__.pop("_calm_request", {})
        if self.pad_prompts_at_end:
            inputs = pad_prompt_at_end(inputs, model.config.patch_size, model.generation_config.pad_token_id)
        if request.get("default_length"):
            length = inputs["input_ids"].shape[-1]
            room = model.config.max_tokens - (-length % model.config.patch_size) - length
            gen_config.max_new_tokens = max(1, min(gen_config.max_new_tokens, room))
        check_generate_request(model, inputs, gen_config, processor)
        inputs = dict(inputs)
        if request.get("seed") is not None:
            inputs["generator"] = torch.Generator(model.device).manual_seed(int(request["seed"]))
        return inputs

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        inputs = self._prepare(model, processor, inputs, gen_config)
        return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        inputs = self._prepare(model, processor, inputs, gen_config)
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        streamer = DirectStreamer(getattr(processor, "tokenizer", processor)._tokenizer, loop, queue, response_parser)
        kwargs = {**inputs, "streamer": streamer, "generation_config": gen_config, "tokenizer": processor}

        def run() -> None:
            try:
                model.generate(**kwargs)
            except _GenerationCancelled:  # the client went away
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as error:  # noqa: BLE001 (reported to the client, which then stops reading)
                logger.error(f"Generation failed for request {request_id}: {error!r}")
                # The handlers paste the message into a JSON string: escaped, so that the event stays valid JSON.
                message = json.dumps(f"{type(error).__name__}: {error}")[1:-1]
                loop.call_soon_threadsafe(queue.put_nowait, _StreamError(message))

        self.submit(run)
        return queue, streamer


class CalmGenerationState(GenerationState):
    """transformers' `GenerationState` with CALM's generation manager, and without continuous batching: its runner
    samples each token from next-token logits over a paged KV cache of tokens, while CALM samples chunks of K tokens
    from a generative head (it has no logits) with a cache of chunks. Asked for, it falls back to `generate`."""

    def use_continuous_batching(self, model, modality) -> bool:
        if self._continuous_batching:
            logger.warning_once(
                "Continuous batching cannot drive CALM (transformers' runner samples tokens from next-token logits "
                "over a paged per-token KV cache; CALM samples chunks of K tokens without logits): requests are "
                "served with model.generate(), one at a time."
            )
        return False

    def __init__(self, *args, pad_prompts_at_end: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_prompts_at_end = pad_prompts_at_end

    def get_manager(self, model_id: str, use_cb: bool = False):
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = CalmGenerateManager(self.pad_prompts_at_end)
        return self._generate_managers[model_id]


class CalmHandlerMixin:
    """What the chat-completions, completions and responses handlers do differently for CALM: its own request
    fields, the refusal of logits-only fields, and the generation config (a `CalmGenerationConfig`)."""

    def _validate_request(self, body: dict) -> None:
        for name, (inactive, reason) in REFUSED_FIELDS.items():
            if not inactive(body.get(name)):
                raise CalmRequestError(f"CALM cannot use {name}={body[name]!r}: {reason}.", param=name)
        super()._validate_request({k: v for k, v in body.items() if k not in CALM_OPTIONS})

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        # The seed goes to the request's generator (CalmGenerateManager), not to torch's global RNG.
        fields = {k: v for k, v in body.items() if k != "seed"}
        try:  # a value that does not parse (temperature, the `generation_config` JSON) or is invalid
            config = super()._build_generation_config(fields, model_generation_config, use_cb=use_cb)
            config = copy.deepcopy(CalmGenerationConfig.from_generation_config(config))
        except ValueError as error:
            param = "generation_config" if "generation_config" in body else None
            raise CalmRequestError(str(error), param=param) from error
        for name in CALM_OPTIONS:
            if body.get(name) is not None:
                setattr(config, name, body[name])
        if config.do_sample is False and config.temperature == 0:
            config.temperature = None  # OpenAI's temperature 0 (greedy): CALM's do_sample=False, the mode
        seed = body.get("seed")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
            raise CalmRequestError(f"seed must be an integer in [0, 2**63), got {seed!r}.", param="seed")
        config._calm_request = {
            "seed": seed,
            "default_length": all(body.get(name) is None for name in LENGTH_FIELDS),
        }
        return config


class CalmChatCompletionHandler(CalmHandlerMixin, ChatCompletionHandler):
    """`/v1/chat/completions` for CALM."""


class CalmCompletionHandler(CalmHandlerMixin, CompletionHandler):
    """`/v1/completions` for CALM."""


class CalmResponseHandler(CalmHandlerMixin, ResponseHandler):
    """`/v1/responses` for CALM."""


class Unavailable:
    """An endpoint of transformers' server that CALM cannot serve: every request is a 400 that says why."""

    def __init__(self, reason: str):
        self.reason = reason

    async def handle_request(self, *args, **kwargs):
        raise CalmRequestError(self.reason)


def build_calm_app(
    model: str,
    device: str = "auto",
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    continuous_batching: bool = False,
    compile: bool = False,
    chat_template: str | None = None,
    enable_cors: bool = False,
    pad_prompts_at_end: bool = False,
):
    """transformers' FastAPI app (`transformers.cli.serving.build_server`) serving the CALM `model` (a folder or a
    Hub id, loaded now): `/v1/chat/completions`, `/v1/completions`, `/v1/responses` (streamed or not),
    `/v1/models`, `/health`. A `CalmRequestError` is answered with a 400 in OpenAI's error format."""
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.server import build_server

    if chat_template is not None and chat_template.endswith(".jinja"):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    manager = CalmModelManager(
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        continuous_batching=continuous_batching,
        force_model=model,
        chat_template=chat_template,
    )
    state = CalmGenerationState(
        continuous_batching=continuous_batching, compile=compile, pad_prompts_at_end=pad_prompts_at_end
    )
    app = build_server(
        manager,
        CalmChatCompletionHandler(manager, state),
        completion_handler=CalmCompletionHandler(manager, state),
        response_handler=CalmResponseHandler(manager, state),
        transcription_handler=Unavailable("CALM is a text model: it has no audio transcription."),
        systemone_handler=Unavailable(f"/v1/systemone returns decision probabilities; {_NO_PROBABILITIES}."),
        generation_state=state,
        enable_cors=enable_cors,
    )

    @app.exception_handler(CalmRequestError)
    async def refuse(request, error: CalmRequestError):
        body = {"message": str(error), "type": "invalid_request_error", "param": error.param, "code": None}
        return JSONResponse({"error": body}, status_code=400)

    app.state.calm = {"model_manager": manager, "generation_state": state}
    return app


def make_server(model: str, host: str = "localhost", port: int = 8000, log_level: str = "warning", **options):
    """A `uvicorn.Server` for `build_calm_app(model, **options)`; `.run()` serves until interrupted (`calm serve`),
    or run it in a thread and set `.should_exit = True` to stop it."""
    import uvicorn

    app = build_calm_app(model, **options)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))


def serve(model: str, **options) -> None:
    """`calm serve MODEL`: serve until interrupted."""
    if options.get("log_level"):
        logging.get_logger("transformers").setLevel(logging.log_levels[options["log_level"].lower()])
    server = make_server(model, **options)
    print(f"[calm] serving {model} at http://{server.config.host}:{server.config.port}/v1", flush=True)
    server.run()


__all__ = [
    "CALM_OPTIONS",
    "DEFAULT_CHAT_TEMPLATE",
    "REFUSED_FIELDS",
    "CalmRequestError",
    "build_calm_app",
    "check_generate_request",
    "make_server",
    "serve",
]
