"""TorchServe handler of the combined model."""

from handlers.listing_handler import ListingHandler


class CombinedHandler(ListingHandler):
    needs = frozenset({"image", "text"})
