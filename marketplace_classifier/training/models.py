"""The three classifiers. Each takes what the handler hands it (uint8 images, token ids
and masks) and returns logits; normalisation lives inside, so serving cannot drift."""

from __future__ import annotations

import torch
from torch import nn


def with_levels(root: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """A model's output: the root head's logits [B,C], then the levels head's [B,K] where it has one
    (serving/taxonomy.py: the categories below the roots)."""
    return root if levels is None else torch.cat([root, levels], dim=1)


def root_logits(output: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The root head's part of a model's output."""
    return output[:, :num_classes]


def levels_logits(output: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The levels head's part of a model's output ([B,0] for a root-only model)."""
    return output[:, num_classes:]


class ImageClassifier(nn.Module):
    """uint8 [B,3,H,W] -> logits [B,C(+K)]: normalise, backbone features, dropout + linear heads
    (the roots', and the levels' when the model has `levels` categories below them)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.2, levels: int = 0):
        super().__init__()
        mean, std = backbone.mean, backbone.std  # what the pretrained weights expect
        self.backbone = backbone
        self.feature_dim, self.num_classes = backbone.feature_dim, num_classes
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))
        self.levels_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, levels)) \
            if levels else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images.float() - self.mean) / self.std)

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        levels = self.levels_head(features) if self.levels_head is not None else None
        return with_levels(self.head(features), levels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(images))

    def feature_branches(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The logits from cached backbone features (frozen training), as a list of one branch."""
        return [self.heads(features)]

    def branches(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self(images)]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return logits[0]


class TextCNNHead(nn.Module):
    """Hidden states [B,T,H] + mask [B,T] -> pooled features -> logits.

    Units of conv -> ReLU -> max-pool -> dropout as in the original study, then a
    global max over time. Padded positions are zeroed after every unit and pooling
    uses ceil mode, so the answer for a text does not depend on how far its batch
    was padded (dynamic padding at serving equals fixed padding in training).
    """

    def __init__(self, hidden_size: int, num_classes: int, channels: tuple[int, ...] = (256, 128),
                 kernel_size: int = 3, dropout: float = 0.3, levels: int = 0):
        super().__init__()
        sizes = (hidden_size, *channels)
        self.convs = nn.ModuleList(nn.Conv1d(sizes[i], sizes[i + 1], kernel_size,
                                             padding=kernel_size // 2) for i in range(len(channels)))
        self.unit_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = channels[-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.levels = nn.Linear(self.feature_dim, levels) if levels else None

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.to(hidden.dtype).unsqueeze(1)  # [B,1,T]
        x = hidden.transpose(1, 2) * keep
        for conv in self.convs:
            # ReLU outputs are >= 0, so zeroed padding never wins a max over real positions
            x = nn.functional.relu(conv(x)) * keep
            x = nn.functional.max_pool1d(x, 2, 2, ceil_mode=True)
            keep = nn.functional.max_pool1d(keep, 2, 2, ceil_mode=True)
            x = self.unit_dropout(x) * keep
        return x.amax(dim=2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = self.dropout(self.pooled(hidden, mask))
        levels = self.levels(features) if self.levels is not None else None
        return with_levels(self.classifier(features), levels)


class LexicalClassifier(nn.Module):
    """Hashed term ids + counts [B,L] -> logits: a linear model over TF-IDF-like weights.

    Each term weighs (1 + log count) * idf, the weights of a text are L2-normalised, and an
    EmbeddingBag sums the terms' class weights (fastText-style, so TorchScript runs it and the
    handler only hashes terms). The idf comes from the training split's products.
    """

    def __init__(self, buckets: int, num_classes: int, levels: int = 0, levels_rank: int = 0,
                 levels_buckets: int = 0):
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, num_classes, mode="sum", padding_idx=0)
        nn.init.zeros_(self.bag.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("idf", torch.ones(buckets))
        # the levels below the roots (hundreds of classes) through a narrow bag and a linear layer:
        # a full-width bag of every bucket would weigh hundreds of megabytes
        self.levels_bag = nn.Embedding(buckets, levels_rank) if levels and levels_rank else None
        self.levels_out = nn.Linear(levels_rank, levels) if self.levels_bag is not None else None
        if self.levels_bag is not None:
            nn.init.normal_(self.levels_bag.weight, std=0.01)
        # or through a full table of fewer buckets, each term folded into one (zeros, like the bag)
        self.levels_buckets = levels_buckets if levels and not levels_rank else 0
        self.levels_table = nn.Parameter(torch.zeros(levels_buckets, levels)) if self.levels_buckets else None
        self.levels_bias = nn.Parameter(torch.zeros(levels)) if self.levels_buckets else None

    @property
    def answers_levels(self) -> bool:
        return self.levels_table is not None or self.levels_bag is not None

    @torch.no_grad()
    def fit_idf(self, term_ids: list[list[int]]) -> None:
        """Smoothed inverse document frequency of every bucket over these documents."""
        frequency = torch.zeros(self.buckets)
        for ids in term_ids:
            frequency[torch.tensor(ids, dtype=torch.long)] += 1
        self.idf.copy_(torch.log((1 + len(term_ids)) / (1 + frequency)) + 1)

    def forward(self, term_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        present = (term_ids > 0).to(counts.dtype)
        weights = (1 + torch.log(counts.clamp(min=1))) * self.idf[term_ids] * present
        weights = weights / weights.norm(dim=1, keepdim=True).clamp(min=1e-6)
        # the bag's weighted sum as a gather and a sum: the same answer, and ONNX exporters take it
        # (they refuse an EmbeddingBag with a padding index; id 0 weighs 0 here anyway)
        rows = nn.functional.embedding(term_ids, self.bag.weight)
        roots = (rows * weights.unsqueeze(2)).sum(1) + self.bias
        if self.levels_table is not None and self.levels_bias is not None:
            folded = torch.remainder(term_ids, self.levels_buckets)
            levels = (nn.functional.embedding(folded, self.levels_table) * weights.unsqueeze(2)).sum(1)
            return torch.cat([roots, levels + self.levels_bias], dim=1)
        if self.levels_bag is None or self.levels_out is None:
            return roots
        narrow = (nn.functional.embedding(term_ids, self.levels_bag.weight) * weights.unsqueeze(2)).sum(1)
        return torch.cat([roots, self.levels_out(narrow)], dim=1)


def mix_log_probabilities(logits: list[torch.Tensor], weights: torch.Tensor, num_classes: int,
                          levels_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the branches' root log-probabilities: a late fusion whose weights are chosen
    on the validation split (each branch trains on its own loss, so none hides another). The
    levels below the roots are mixed over the branches that answer them, by `levels_weights`
    (chosen on validation for the whole path) or else by the roots' weights; the first branch's
    pass unchanged when it alone answers them."""
    levels_weights = weights if levels_weights is None else levels_weights
    first = logits[0].float()
    mixed = weights[0] * torch.log_softmax(root_logits(first, num_classes), dim=1)
    levels = levels_logits(first, num_classes)
    with_levels = [index for index in range(1, len(logits)) if logits[index].shape[1] == first.shape[1]]
    if with_levels and levels.shape[1]:
        levels = levels_weights[0] * torch.log_softmax(levels, dim=1)
    for index in range(1, len(logits)):
        branch = logits[index].float()
        mixed = mixed + weights[index] * torch.log_softmax(root_logits(branch, num_classes), dim=1)
        if index in with_levels and levels.shape[1]:
            levels = levels + levels_weights[index] * torch.log_softmax(levels_logits(branch, num_classes),
                                                                        dim=1)
    return torch.cat([mixed, levels], dim=1)


def register_branch_mixes(module: nn.Module, lexical: nn.Module | None) -> None:
    """The weights of a model's branches [first, lexical]: `mix` for the roots, and, when the
    lexical branch answers the levels too, `levels_branch_mix` for them (both chosen on validation
    after training)."""
    if lexical is None:
        return
    module.register_buffer("mix", torch.tensor([0.5, 0.5]))
    if lexical.answers_levels:
        module.register_buffer("levels_branch_mix", torch.tensor([0.5, 0.5]))


def combine_branches(module: nn.Module, logits: list[torch.Tensor]) -> torch.Tensor:
    """A model's answer from its branches' logits (see mix_log_probabilities)."""
    if len(logits) == 1:
        return logits[0]
    return mix_log_probabilities(logits, module.mix, module.num_classes,
                                 getattr(module, "levels_branch_mix", None))


class TextClassifier(nn.Module):
    """token ids [B,T] + attention mask [B,T] (+ lexical term ids and counts) -> logits,
    through a BERT-family encoder and, with `lexical_buckets`, a lexical branch beside it."""

    def __init__(self, encoder: nn.Module, num_classes: int, lexical_buckets: int = 0, levels: int = 0,
                 lexical_levels_rank: int = 0, lexical_levels_buckets: int = 0, **head_options):
        super().__init__()
        self.encoder = encoder
        self.head = TextCNNHead(encoder.config.hidden_size, num_classes, levels=levels, **head_options)
        self.feature_dim, self.num_classes = self.head.feature_dim, num_classes
        self.lexical = LexicalClassifier(lexical_buckets, num_classes, levels, lexical_levels_rank,
                                         lexical_levels_buckets) \
            if lexical_buckets else None
        register_branch_mixes(self, self.lexical)  # encoder, lexical

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def branch_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      *lexical_inputs: torch.Tensor) -> list[torch.Tensor]:
        logits = [self.head(hidden, attention_mask)]
        if self.lexical is not None:
            logits.append(self.lexical(*lexical_inputs))
        return logits

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return combine_branches(self, logits)

    def branches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 *lexical_inputs: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.branch_logits(hidden, attention_mask, *lexical_inputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *lexical_inputs: torch.Tensor) -> torch.Tensor:
        return self.combine(self.branches(input_ids, attention_mask, *lexical_inputs))


class CombinedClassifier(nn.Module):
    """Photo + text -> logits: penultimate features of both branches fused by one linear layer,
    mixed (when the text model has one) with the text model's lexical branch."""

    def __init__(self, image_model: ImageClassifier, text_model: TextClassifier, num_classes: int,
                 dropout: float = 0.2, levels: int = 0):
        super().__init__()
        self.image_model = image_model
        self.text_model = text_model
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        width = image_model.feature_dim + text_model.feature_dim
        self.fusion = nn.Linear(width, num_classes)
        self.levels_fusion = nn.Linear(width, levels) if levels else None
        register_branch_mixes(self, text_model.lexical)  # fusion, lexical
        if self.levels_fusion is not None and text_model.head.levels is not None:
            # the levels of the fusion and of the text model's own head, mixed by weights chosen on
            # validation after training (train.choose_path_weights); [1, 0] trains the fusion alone
            self.register_buffer("levels_mix", torch.tensor([1.0, 0.0]))

    @torch.no_grad()
    def init_fusion_from_heads(self) -> None:
        """Start as the sum of the two trained single models' logits."""
        image_linear, text_linear = self.image_model.head[-1], self.text_model.head.classifier
        self.fusion.weight.copy_(torch.cat([image_linear.weight, text_linear.weight], dim=1))
        self.fusion.bias.copy_(image_linear.bias + text_linear.bias)
        if self.levels_fusion is not None:
            image_levels, text_levels = self.image_model.levels_head[-1], self.text_model.head.levels
            self.levels_fusion.weight.copy_(torch.cat([image_levels.weight, text_levels.weight], dim=1))
            self.levels_fusion.bias.copy_(image_levels.bias + text_levels.bias)

    def fuse(self, image_features: torch.Tensor, hidden: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fuse_features(image_features, self.text_model.head.pooled(hidden, attention_mask))

    def fuse_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(torch.cat([image_features, text_features], dim=1))
        levels = self.levels_fusion(features) if self.levels_fusion is not None else None
        if levels is not None and self.text_model.head.levels is not None:
            text_levels = self.text_model.head.levels(self.text_model.head.dropout(text_features))
            levels = self.levels_mix[0] * torch.log_softmax(levels, dim=1) \
                + self.levels_mix[1] * torch.log_softmax(text_levels, dim=1)
        return with_levels(self.fusion(features), levels)

    def fused_branches(self, image_features: torch.Tensor, hidden: torch.Tensor,
                       attention_mask: torch.Tensor, *lexical_inputs: torch.Tensor) -> list[torch.Tensor]:
        logits = [self.fuse(image_features, hidden, attention_mask)]
        if self.text_model.lexical is not None:
            logits.append(self.text_model.lexical(*lexical_inputs))
        return logits

    def branches(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 *lexical_inputs: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.text_model.hidden_states(input_ids, attention_mask)
        return self.fused_branches(self.image_model.features(images), hidden, attention_mask,
                                   *lexical_inputs)

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return combine_branches(self, logits)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *lexical_inputs: torch.Tensor) -> torch.Tensor:
        return self.combine(self.branches(images, input_ids, attention_mask, *lexical_inputs))

    def listings(self, images: torch.Tensor, listing_of_photo: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, *lexical_inputs: torch.Tensor) -> torch.Tensor:
        """forward for listings whose text runs once: photos [P,3,H,W], `listing_of_photo` [P] the
        row of each photo's listing in the text inputs (one row per listing); logits per photo,
        equal to forward with each photo beside its listing's text."""
        hidden = self.text_model.hidden_states(input_ids, attention_mask)
        text_features = self.text_model.head.pooled(hidden, attention_mask).index_select(0, listing_of_photo)
        logits = [self.fuse_features(self.image_model.features(images), text_features)]
        if self.text_model.lexical is not None:
            logits.append(self.text_model.lexical(*lexical_inputs).index_select(0, listing_of_photo))
        return self.combine(logits)

    def text_only(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  *lexical_inputs: torch.Tensor) -> torch.Tensor:
        """The answer for a listing without a photo: the text model it was built on."""
        return self.text_model(input_ids, attention_mask, *lexical_inputs)
