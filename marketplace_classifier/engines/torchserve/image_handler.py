"""TorchServe handler of the image model."""

from marketplace_classifier.engines.torchserve.listing_handler import ListingHandler
from marketplace_classifier.serving.model_kinds import IMAGE


class ImageHandler(ListingHandler):
    needs = IMAGE.needs
