from common.networks.resdsn import RESIDUAL_MODES, ResDSN, ResDSNLoss  # noqa: F401
from common.networks.unet_brats import SliceWise2D, UNetBraTS, brats_to_index, index_to_brats  # noqa: F401
from common.networks.nlce import NLCE, ContextEncoding, NonLocalBlock, encode_residuals  # noqa: F401
from common.networks.nlcen import NLCEN, NLCENLoss, UNetWithNLCE, add_nlce_to_unet  # noqa: F401
from common.networks.resunetpp import ResUNetPlusPlus  # noqa: F401
from common.networks.deeplabv2 import DeepLabV2, deeplab_dilations  # noqa: F401
