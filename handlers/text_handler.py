"""TorchServe handler of the text model."""

from handlers.listing_handler import ListingHandler
from serving.model_kinds import TEXT


class TextHandler(ListingHandler):
    needs = TEXT.needs
