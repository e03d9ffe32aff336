"""TorchServe handler of the image model."""

from handlers.listing_handler import ListingHandler
from serving.model_kinds import IMAGE


class ImageHandler(ListingHandler):
    needs = IMAGE.needs
