"""TorchServe handler of the text model."""

from marketplace_classifier.engines.torchserve.listing_handler import ListingHandler
from marketplace_classifier.serving.model_kinds import TEXT


class TextHandler(ListingHandler):
    needs = TEXT.needs
