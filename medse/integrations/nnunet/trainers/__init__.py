"""nnU-Net trainers shipped by medse. Point nnU-Net at this folder::

    export nnUNet_extTrainer=$(python -c "import medse.integrations.nnunet as m; print(m.trainer_folder())")

nnU-Net then finds ``nnUNetTrainer_medseShort`` by name (in ``nnUNetv2_train -tr`` and at prediction time,
from the checkpoint's trainer name).
"""
