"""Training: the cached recipe (the trunk's top on cached features, any metric loss), the lesion
recipe (the whole network with a tumor decoder), hyper-parameter search and calibration
fitting, all on training patients only. Nothing in the serving path imports this package."""
