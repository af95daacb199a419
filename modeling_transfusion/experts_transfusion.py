"""Modality experts: image slots get weights of their own in every decoder layer (LMFusion, arXiv 2412.15188;
Mixture-of-Transformers, arXiv 2411.04996; BAGEL's generation expert).

Every per-token module of a decoder layer (the q/k/v/o projections and any q/k norms of the attention, the linear
layers of the MLP, the layer norms) and the backbone's final norm keeps its pretrained weights for text and gets a twin
for image slots, registered beside it as `image_<name>` (`self_attn.q_proj` -> `self_attn.image_q_proj`). Attention
itself is shared: text and image tokens meet in one softmax under the Transfusion mask.

Routing is hard, by the image-slot mask, and happens where the backbone reads the module: the parent module's class
is given a property per routed name, so that `self.q_proj(hidden_states)` in the backbone's own code returns the text
module, the image twin, or (for a mixed step) a call that gathers the tokens of each modality, runs each through its
own module once and scatters the results back. The parameters keep their names (`self_attn.q_proj.weight` is the text
weight), so a plain `*ForCausalLM` checkpoint loads into the text path and a LoRA on `q_proj` adapts text tokens only.

The mask reaches the backbone as a forward keyword (`image_slot_mask`), which decoder layers hand on unchanged: forward
hooks on the backbone read it (for the final norm), and every decoder layer's `forward` reads it, so that activation
checkpointing, which runs a layer's `forward` again in the backward pass, routes the recomputation as the forward.

The tokens Transfusion adds (`<boi>`, `<eoi>`, `<image>`) belong to the image path as well: their rows are parameters
of their own, `embed_tokens.image_tokens_weight` (returned by the embedding for those ids) and
`lm_head.image_tokens_weight` (their logits; tied to the first when the LLM ties its head). The rows the LLM had are
never read for them, so a frozen text path stays the LLM's.

Full experts copy every routed module. Low-rank experts (`config.modality_experts_rank`) keep the norms as full copies
and give each linear layer a trained low-rank delta on top of the text weight: image weight = text weight + B A.
"""

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

# The forward keyword that carries the `(batch_size, sequence_length)` boolean mask of image slots into the backbone.
ROUTING_KWARG = "image_slot_mask"
IMAGE_PREFIX = "image_"

_routed_classes: dict[tuple[type, tuple[str, ...]], type] = {}


class TransfusionLowRankExpert(nn.Module):
    """The image twin of a linear layer in low-rank form: `delta(x) = x A^T B^T`, added to the text layer's output for
    image tokens. `B` starts at zero, so the expert starts as an exact copy of the text layer."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.weight_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_b = nn.Parameter(torch.zeros(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self):
        # transformers' init functions leave weights loaded from a checkpoint as they are.
        init.kaiming_uniform_(self.weight_a, a=5**0.5)
        init.zeros_(self.weight_b)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(hidden_states, self.weight_a), self.weight_b)


class _LowRankCall:
    """Text layer plus low-rank delta: how image tokens go through a linear layer with low-rank experts."""

    __slots__ = ("text", "expert")

    def __init__(self, text: nn.Module, expert: TransfusionLowRankExpert):
        self.text, self.expert = text, expert

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.text(hidden_states) + self.expert(hidden_states)


class ModalityRouting:
    """Which tokens of the running forward are image slots, for the routed modules of one backbone.

    `mode` is `"text"` (no image slot, also outside any forward), `"image"` (only image slots) or `"mixed"`; in mixed
    mode `text_index` and `image_index` are the flat positions (over batch x sequence) of each modality."""

    def __init__(self):
        self.mode = "text"
        self.mask = self.text_index = self.image_index = None
        self._gathered_input = self._gathered = None
        self._outer_masks = []

    def enter(self, module, args, kwargs) -> None:
        """Forward pre-hook of the backbone and of each decoder layer: routes by the `image_slot_mask` keyword."""
        self._outer_masks.append(self.mask)
        self.set(kwargs.get(ROUTING_KWARG))

    def leave(self, module, args, kwargs, output) -> None:
        """Forward hook paired with [`~ModalityRouting.enter`]: restores the routing of the enclosing call."""
        self.set(self._outer_masks.pop() if self._outer_masks else None)

    def set(self, mask: torch.BoolTensor | None) -> None:
        """Routes the next calls by `mask` `(batch_size, sequence_length)`; `None` routes everything to text."""
        if mask is self.mask and mask is not None:
            return
        self.mask, self._gathered_input, self._gathered = mask, None, None
        if mask is None or not mask.any():
            self.mode, self.text_index, self.image_index = "text", None, None
        elif mask.all():
            self.mode, self.text_index, self.image_index = "image", None, None
        else:
            flat = mask.flatten()
            self.mode = "mixed"
            self.image_index = flat.nonzero().squeeze(1)
            self.text_index = (~flat).nonzero().squeeze(1)

    def _split(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The q, k and v projections (and the MLP's gate and up) read the same tensor: it is gathered once.
        if hidden_states is not self._gathered_input:
            if tuple(hidden_states.shape[:2]) != tuple(self.mask.shape):
                raise ValueError(
                    f"Modality experts route tokens by the image-slot mask of shape {tuple(self.mask.shape)}, but a "
                    f"routed module received a tensor of shape {tuple(hidden_states.shape)}: the backbone must call "
                    "its per-token modules on (batch, sequence, ...) tensors."
                )
            flat = hidden_states.flatten(0, 1)
            self._gathered_input = hidden_states
            self._gathered = (flat.index_select(0, self.text_index), flat.index_select(0, self.image_index))
        return self._gathered

    def route(self, text, image, hidden_states: torch.Tensor) -> torch.Tensor:
        """Runs text tokens through `text` and image tokens through `image`, each once, and puts them back in order."""
        text_states, image_states = self._split(hidden_states)
        text_out, image_out = text(text_states), image(image_states)
        out = text_out.new_empty(hidden_states.shape[0] * hidden_states.shape[1], *text_out.shape[1:])
        out = out.index_copy(0, self.text_index, text_out).index_copy(0, self.image_index, image_out)
        return out.unflatten(0, hidden_states.shape[:2])


class _MixedCall:
    """A routed module called in a step that holds both modalities."""

    __slots__ = ("routing", "text", "image")

    def __init__(self, routing: ModalityRouting, text, image):
        self.routing, self.text, self.image = routing, text, image

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.routing.route(self.text, self.image, hidden_states)


def _routed_property(name: str) -> property:
    image_name = IMAGE_PREFIX + name

    def get(module):
        modules = module._modules
        text, routing = modules[name], module.__dict__["_modality_routing"]
        if routing.mode == "text":
            return text
        image = modules[image_name]
        if isinstance(image, TransfusionLowRankExpert):
            image = _LowRankCall(text, image)
        return image if routing.mode == "image" else _MixedCall(routing, text, image)

    return property(get, doc=f"`{name}` for text tokens, `{image_name}` for image slots (modality experts).")


def _routing_forward(base: type):
    def forward(self, *args, **kwargs):
        routing = self._modality_routing
        routing.enter(self, args, kwargs)
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            routing.leave(self, args, kwargs, None)

    return forward


def _route_children(parent: nn.Module, names: list[str], routing: ModalityRouting, routes_itself: bool = False) -> None:
    """Gives `parent` a class whose attributes `names` are routed by `routing` (one class per original class). With
    `routes_itself` (decoder layers), its `forward` also sets the routing from its `image_slot_mask` keyword."""
    names = tuple(sorted(names))
    base = type(parent)
    key = (base, names, routes_itself)
    if key not in _routed_classes:
        attributes = {name: _routed_property(name) for name in names}
        if routes_itself:
            attributes["forward"] = _routing_forward(base)
        _routed_classes[key] = type(base.__name__, (base,), attributes)
    parent.__class__ = _routed_classes[key]
    parent._modality_routing = routing
    if isinstance(parent, PreTrainedModel):
        # Private registry (tests/test_private_api.py): transformers finds what `output_hidden_states` and
        # `output_attentions` record by the model's class, so the routed class registers its base's recorders.
        _CAN_RECORD_REGISTRY[parent] = parent._can_record_outputs


def _per_token_children(parent: nn.Module) -> list[str]:
    """The direct children of `parent` that hold parameters and nothing below them (linear layers, norms)."""
    names = []
    for name, child in parent.named_children():
        if any(True for _ in child.parameters(recurse=False)) and not any(True for _ in child.children()):
            names.append(name)
    return names


def _layer_groups(language_model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every module that owns per-token children, with their names: each decoder layer (its norms), the modules
    inside it (attention, MLP), and the backbone itself (its final norm)."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"modality_experts needs a decoder that keeps its layers in `layers` (Llama, Qwen2, Mistral, ...); "
            f"{type(language_model).__name__} does not."
        )
    groups = []
    for layer in layers:
        groups.append((layer, _per_token_children(layer)))
        for block_name, block in layer.named_children():
            if not any(True for _ in block.children()):
                continue
            for name, child in block.named_children():
                if any(True for _ in child.children()) and any(True for _ in child.parameters()):
                    raise ValueError(
                        f"modality_experts routes per-token layers (linear layers and norms); {block_name}.{name} of "
                        f"{type(layer).__name__} ({type(child).__name__}) is a block of its own, e.g. a mixture of "
                        "experts, which is not supported."
                    )
            groups.append((block, _per_token_children(block)))
    final = [
        name
        for name in _per_token_children(language_model)
        if not isinstance(language_model._modules[name], nn.Embedding)
    ]
    groups.append((language_model, final))
    return [(parent, names) for parent, names in groups if names]


def _embedding_forward(base: type):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = base.forward(self, input_ids)
        token_ids = torch.tensor(self.image_token_ids, device=input_ids.device)
        match = input_ids.unsqueeze(-1) == token_ids  # [..., num_image_tokens]
        if not match.any():
            return embeds
        rows = nn.functional.embedding(match.int().argmax(-1), self.image_tokens_weight).to(embeds.dtype)
        return torch.where(match.any(-1, keepdim=True), rows, embeds)

    return forward


def _head_forward(base: type):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = base.forward(self, hidden_states)
        image_logits = nn.functional.linear(hidden_states, self.image_tokens_weight.to(hidden_states.dtype))
        token_ids = torch.tensor(self.image_token_ids, device=logits.device)
        return logits.index_copy(-1, token_ids, image_logits.to(logits.dtype))

    return forward


def add_image_token_rows(module: nn.Embedding | nn.Linear, token_ids: list[int]) -> None:
    """Gives the tokens `token_ids` rows of their own in an input embedding or an LM head: a parameter
    `image_tokens_weight` (first filled with their current rows), read instead of the matrix's rows for those ids, in
    the module's own forward (so that FSDP gathers it with the module)."""
    base = type(module)
    forward = _embedding_forward if isinstance(module, nn.Embedding) else _head_forward
    key = (base, ("image_tokens_weight",))
    if key not in _routed_classes:
        _routed_classes[key] = type(base.__name__, (base,), {"forward": forward(base)})
    module.__class__ = _routed_classes[key]
    module.image_token_ids = list(token_ids)  # not a buffer: from_pretrained leaves those it builds empty
    module.image_tokens_weight = nn.Parameter(module.weight.detach()[token_ids].clone())


def add_image_experts(language_model: nn.Module, rank: int | None = None) -> ModalityRouting:
    """Adds an image twin (`image_<name>`) beside every per-token module of `language_model` and routes each by the
    image-slot mask the backbone receives as `image_slot_mask`. With `rank`, linear layers get low-rank twins.

    Returns the [`ModalityRouting`] the routed modules read."""
    routing = ModalityRouting()
    layers = set(language_model.layers)
    for parent, names in _layer_groups(language_model):
        for name in names:
            text = parent._modules[name]
            if rank is not None and isinstance(text, nn.Linear):
                image = TransfusionLowRankExpert(text.in_features, text.out_features, rank)
                image.to(device=text.weight.device, dtype=text.weight.dtype)
            else:
                image = copy.deepcopy(text)
            parent.add_module(IMAGE_PREFIX + name, image)
        _route_children(parent, names, routing, routes_itself=parent in layers)

    # The backbone's hooks route its final norm and return to text after it. Each layer routes itself in its
    # `forward`, which activation checkpointing runs again in the backward pass (hooks stay outside the checkpoint).
    # Bound methods: a deep copy of the model gets hooks bound to its own copy of the routing.
    language_model.register_forward_pre_hook(routing.enter, with_kwargs=True)
    language_model.register_forward_hook(routing.leave, with_kwargs=True, always_call=True)
    return routing


def image_path_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters under `module` that image slots and image tokens use alone: the image twins and the image
    tokens' rows (of the input embedding and the LM head)."""
    parameters = [p for _, _, image in image_expert_pairs(module) for p in image.parameters()]
    rows = [
        m.image_tokens_weight
        for m in module.modules()
        if isinstance(getattr(m, "image_tokens_weight", None), nn.Parameter)
    ]
    return parameters + list({id(p): p for p in rows}.values())


def image_expert_pairs(language_model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """`(name, text module, image twin)` for every routed module of a backbone with experts (names relative to it)."""
    pairs = []
    for parent_name, parent in language_model.named_modules():
        routing_names = [name for name in parent._modules if name.startswith(IMAGE_PREFIX)]
        for image_name in routing_names:
            name = image_name[len(IMAGE_PREFIX) :]
            if name in parent._modules:
                full = f"{parent_name}.{name}" if parent_name else name
                pairs.append((full, parent._modules[name], parent._modules[image_name]))
    return pairs


@torch.no_grad()
def copy_text_weights_to_experts(language_model: nn.Module) -> int:
    """LMFusion's initialisation: every image twin becomes a copy of its text module (a low-rank twin gets a zero
    delta). Returns the number of twins set."""
    pairs = image_expert_pairs(language_model)
    for _, text, image in pairs:
        if isinstance(image, TransfusionLowRankExpert):
            image.weight_b.zero_()
        else:
            image.load_state_dict(text.state_dict())
    return len(pairs)


__all__ = [
    "ROUTING_KWARG",
    "ModalityRouting",
    "TransfusionLowRankExpert",
    "add_image_experts",
    "add_image_token_rows",
    "image_path_parameters",
    "copy_text_weights_to_experts",
    "image_expert_pairs",
]
