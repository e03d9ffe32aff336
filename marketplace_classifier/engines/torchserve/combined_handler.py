"""TorchServe handler of the combined model."""

from marketplace_classifier.engines.torchserve.listing_handler import ListingHandler
from marketplace_classifier.serving.model_kinds import COMBINED


class CombinedHandler(ListingHandler):
    needs = COMBINED.needs
