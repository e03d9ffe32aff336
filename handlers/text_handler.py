"""TorchServe handler of the text model."""

from handlers.listing_handler import ListingHandler


class TextHandler(ListingHandler):
    needs = frozenset({"text"})
