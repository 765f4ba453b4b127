"""Small networks for the feature-test demonstrations: an MLP, an 8x8-image CNN, a bag-of-words
text classifier, each with a builder that a `model=` config instantiates."""

from collections.abc import Sequence

from torch import Tensor, nn

from osftkit.models import LoadedModel


class MLP(nn.Sequential):
    """ReLU network; the reference model of the simulation has two hidden layers of 100."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (100, 100), out_features: int = 1):
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(sizes[-1], out_features))


class SmallCNN(nn.Sequential):
    """Two 3x3 convolutions and a linear head for (b, 1, 8, 8) digit images."""

    def __init__(self, num_classes: int = 10, channels: int = 16, image_size: int = 8):
        super().__init__(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * (image_size // 2) ** 2, num_classes),
        )


class TextClassifier(nn.Module):
    """Mean of token embeddings, then an MLP: (b, L) token ids -> (b, num_classes) logits."""

    def __init__(
        self, vocab_size: int, embed_dim: int = 32, hidden: int = 64, num_classes: int = 2
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.head = MLP(embed_dim, (hidden,), num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.embed(input_ids).mean(1))


def build_mlp(
    in_features: int, hidden: Sequence[int] = (100, 100), out_features: int = 1
) -> LoadedModel:
    return LoadedModel(model=MLP(in_features, tuple(hidden), out_features))


def build_cnn(num_classes: int = 10, channels: int = 16) -> LoadedModel:
    return LoadedModel(model=SmallCNN(num_classes, channels))


def build_text_classifier(
    vocab_size: int, embed_dim: int = 32, hidden: int = 64, num_classes: int = 2
) -> LoadedModel:
    return LoadedModel(model=TextClassifier(vocab_size, embed_dim, hidden, num_classes))
