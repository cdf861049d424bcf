"""The six STOA-VLP pre-training objectives and the `Pretrainer` criterion that combines them.

vtc: video-text contrastive; vtm: video-text matching with hard negatives; mlm: masked language
modelling; plm: prefix language modelling; matching: DOTA (trajectories to nouns) and STASP
(actions to verbs) with Hungarian matching; pretrainer: the weighted total for a Batch.
"""

from stoa_vlp.objectives.pretrainer import OBJECTIVES, Pretrainer, check_loss_config

__all__ = ["OBJECTIVES", "Pretrainer", "check_loss_config"]
