"""Import every domain module, so each registers itself in :data:`scenarios.domains.base.DOMAINS`."""

import scenarios.domains.aircraft
import scenarios.domains.caltech101
import scenarios.domains.cifar100
import scenarios.domains.dtd
import scenarios.domains.eurosat
import scenarios.domains.flowers102
import scenarios.domains.food101
import scenarios.domains.mnist
import scenarios.domains.oxford_pet
import scenarios.domains.stanford_cars
import scenarios.domains.sun397  # noqa: F401
