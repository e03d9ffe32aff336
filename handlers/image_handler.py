"""TorchServe handler of the image model."""

from handlers.listing_handler import ListingHandler


class ImageHandler(ListingHandler):
    needs = frozenset({"image"})
