"""What refit ships inside every model archive (.mar): the TorchServe handler."""
