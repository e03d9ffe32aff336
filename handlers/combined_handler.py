"""TorchServe handler of the combined model."""

from handlers.listing_handler import ListingHandler
from serving.model_kinds import COMBINED


class CombinedHandler(ListingHandler):
    needs = COMBINED.needs
