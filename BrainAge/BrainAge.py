"""BrainAge: brain age and its attention map from one T1-weighted MRI, in 3D Slicer.

The module is a thin layer over BrainAgeLib (the Slicer-independent library beside it): the
widget gathers inputs and shows results, the logic converts MRML nodes to and from
BrainAgeLib Volumes (BrainAgeLib.slicer_bridge) and runs the model. Batch use from Slicer's
Python console:

    logic = slicer.util.getModuleLogic("BrainAge")
    result = logic.process(getNode("MRHead"), sex="F", chronologicalAge=63)
    logic.processFiles("/data/cohort.csv", "/data/brainage-out")
"""
import concurrent.futures
import logging
import os
import sys
import time

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# Installed, BrainAgeLib sits beside this file; in a source checkout it is one folder up.
_moduleDir = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_moduleDir, "BrainAgeLib")):
    sys.path.insert(0, os.path.dirname(_moduleDir))

SEX_CODES = ("F", "M", "unknown")  # the order of the sex combo box items
# Slicer's PythonQt keeps the GIL in the GUI thread while Qt's event loop runs, so a Python worker
# thread only runs while the GUI thread runs Python. The poll timer therefore fires often and
# sleeps a little each time (releasing the GIL) so the estimate proceeds at nearly full speed,
# while the GUI still handles its events between ticks (as SlicerSimpleFilters does).
POLL_INTERVAL_MS = 20
POLL_YIELD_S = 0.012
ATTENTION_LEVELS = 10
COLOR_TABLE_NAME = "BrainAgeAttention"
BRAIN_MASK_SUFFIX = " brain mask"  # the brain mask labelmap is named "<input> brain mask"
PYTORCH_EXTENSION_MISSING = (
    "BrainAge needs the PyTorch extension to install torch. Install 'PyTorch' from the "
    "Extensions Manager, restart Slicer, and try again.")


class BrainAge(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Brain Age"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainAge developers"]
        self.parent.helpText = """
Estimates the <b>brain age</b> of one 3D T1-weighted MRI with the two-stage BrainRotViT model, and
shows where the model looked as an attention labelmap over the scan (10 = the tenth of brain voxels
it attended to most). <b>Show brain mask</b> shows the brain the model read instead; the results
list the quality-control checks of the input (brain volume, field of view, voxel size, T1 contrast).<br><br>
<b>Brain-age gap (BAG)</b> = predicted brain age - chronological age, in years: a positive gap means the
brain looks older than the person is. The <b>bias-corrected BAG</b> removes the model's known trend to
overestimate young and underestimate old people (de Lange &amp; Cole), when the model carries its
correction coefficients.<br><br>
<b>The bundled demo model is trained on synthetic phantoms, not on real people.</b> It demonstrates
and tests the software; its ages, gaps and maps mean nothing clinically. Load a model trained on real
scans (a file or https URL) for research use. No model here is a medical device.
"""
        self.parent.acknowledgementText = """
BrainAge implements BrainRotViT: Jalal, Rahman, Rahman &amp; Rahman (2025), "BrainRotViT",
<a href="https://arxiv.org/abs/2511.15188">arXiv:2511.15188</a>. Bias correction after de Lange &amp; Cole
(2020), NeuroImage: Clinical 26:102229. Module layout after lassoan's SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg.
"""


class BrainAgeWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainAge.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BrainAgeLogic()
        self.logic.logCallback = self.showStatus
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.job = None  # (future, relay, inputs) while an estimate runs in the background
        self.shownLabelmaps = (None, None)  # (attention labelmap, brain mask) of the last result
        self.starting = False  # True while onEstimate installs packages/loads the model
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollJob)

        for selector in (self.ui.inputVolumeSelector, self.ui.outputAttentionSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateEstimateButton)
        for comboBox in (self.ui.sexComboBox, self.ui.modelSourceComboBox, self.ui.deviceComboBox):
            comboBox.connect("currentIndexChanged(int)", self.updateEstimateButton)
        self.ui.chronologicalAgeSpinBox.connect("valueChanged(double)", self.updateEstimateButton)
        self.ui.modelLocationLineEdit.connect("textChanged(QString)", self.updateEstimateButton)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.showBrainMaskCheckBox.connect("toggled(bool)", self.onShowBrainMask)
        self.ui.estimateButton.connect("clicked(bool)", self.onEstimate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.setRunning(False)

    def cleanup(self):
        if self.job:
            self.job[1].cancel()
        self.pollTimer.stop()
        self.executor.shutdown(wait=False)

    def inputs(self):
        """The form as the arguments of BrainAgeLogic.process."""
        age = self.ui.chronologicalAgeSpinBox.value
        modelChoice = self.ui.modelSourceComboBox.currentIndex
        return {
            "inputVolumeNode": self.ui.inputVolumeSelector.currentNode(),
            "sex": SEX_CODES[max(self.ui.sexComboBox.currentIndex, 0)],
            "chronologicalAge": age if age > 0 else None,  # 0 shows as "(not given)"
            "model": "demo" if modelChoice == 0 else os.path.expanduser(self.ui.modelLocationLineEdit.text.strip()),
            "device": self.ui.deviceComboBox.currentText,
        }

    def updateEstimateButton(self, *unused):
        from BrainAgeLib.slicer_bridge import check_inputs

        inputs = self.inputs()
        self.ui.modelLocationLineEdit.enabled = self.ui.modelSourceComboBox.currentIndex != 0
        node = inputs["inputVolumeNode"]
        imageData = node.GetImageData() if node else None
        attentionNode = self.ui.outputAttentionSelector.currentNode()
        problems = check_inputs(
            imageData.GetDimensions() if imageData else None, inputs["sex"], inputs["chronologicalAge"],
            inputs["model"], inputs["device"], self.logic.cudaAvailable(),
            attention_output_is_input=node is not None and attentionNode is not None and attentionNode.GetID() == node.GetID())
        self.ui.estimateButton.enabled = not problems and self.job is None and not self.starting
        self.ui.estimateButton.toolTip = "\n".join(problems) or "Estimate the brain age of the selected volume."
        if self.job is None:
            self.showStatus(" ".join(problems))

    def showStatus(self, text):
        self.ui.statusLabel.text = text

    def setRunning(self, running):
        self.ui.progressBar.visible = running
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.value = 0
        self.updateEstimateButton()

    def onEstimate(self):
        from BrainAgeLib.slicer_bridge import ProgressRelay

        if self.starting or self.job is not None:
            return  # pip output processes events while installing: a second click lands here
        self.ui.resultsTextBrowser.setHtml("")
        self.starting = True
        self.ui.estimateButton.enabled = False
        try:
            with slicer.util.tryWithErrorDisplay("Could not start the brain age estimate.", waitCursor=True):
                self.logic.setupPythonRequirements()
                inputs = self.inputs()
                volume = self.logic.volumeFromNode(inputs["inputVolumeNode"])
                model = self.logic.loadModel(inputs["model"])
                relay = ProgressRelay()
                future = self.executor.submit(
                    self.logic.estimate, model, volume, inputs["sex"], inputs["chronologicalAge"], inputs["device"], relay)
                self.job = (future, relay, inputs)
                self.setRunning(True)
                self.pollTimer.start()
        finally:
            self.starting = False
            self.updateEstimateButton()

    def onCancel(self):
        if self.job:
            self.job[1].cancel()
            self.ui.cancelButton.enabled = False
            self.showStatus("Cancelling...")

    def onPollJob(self):
        """Runs every POLL_INTERVAL_MS on the GUI thread while the worker thread estimates."""
        from BrainAgeLib.slicer_bridge import EstimationCancelled, result_text

        time.sleep(POLL_YIELD_S)  # lets the worker thread run (see POLL_INTERVAL_MS)
        future, relay, inputs = self.job
        fraction, message = relay.snapshot()
        self.ui.progressBar.value = int(round(100 * fraction))
        if not future.done():
            if not relay.cancelled:
                self.showStatus(message)
            return
        self.pollTimer.stop()
        self.job = None
        self.setRunning(False)
        if isinstance(future.exception(), EstimationCancelled):
            self.showStatus("Cancelled.")
            return
        if not slicer.mrmlScene.IsNodePresent(inputs["inputVolumeNode"]):
            self.showStatus("The input volume was removed while the estimate ran; nothing to show.")
            return
        with slicer.util.tryWithErrorDisplay("Brain age estimation failed."):
            result = future.result()
            self.shownLabelmaps = self.logic.showResult(
                result, inputs["inputVolumeNode"], self.ui.outputLabelmapSelector.currentNode(),
                self.ui.outputAttentionSelector.currentNode(), self.ui.opacitySliderWidget.value,
                self.ui.showBrainMaskCheckBox.checked)
            self.ui.outputLabelmapSelector.setCurrentNode(self.shownLabelmaps[0])
            self.ui.resultsTextBrowser.setHtml(result_text(result))
            self.showStatus(f"Done in {result.timings.get('total', 0.0):.1f} s.")

    def onOpacityChanged(self, opacity):
        slicer.util.setSliceViewerLayers(labelOpacity=opacity)

    def onShowBrainMask(self, show):
        from BrainAgeLib.slicer_bridge import label_layer_node

        node = label_layer_node(show, *self.shownLabelmaps)
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            slicer.util.setSliceViewerLayers(label=node)


class BrainAgeLogic(ScriptedLoadableModuleLogic):
    """Runs BrainAge on MRML volume nodes. No widgets here: the Python console can use it all."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self._models = {}
        self._requirementsReady = False

    def log(self, text):
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing, after one confirmation: torch through PyTorchUtils, the
        rest pinned through pip (BrainAgeLib.slicer_bridge.PIP_REQUIREMENTS)."""
        if self._requirementsReady:
            return
        from BrainAgeLib.slicer_bridge import TORCH_REQUIREMENT, installed_version, missing_requirements, torch_missing

        needTorch = torch_missing(installed_version)
        missing = missing_requirements(installed_version)
        if needTorch or missing:
            if needTorch:
                try:
                    import PyTorchUtils
                except ModuleNotFoundError:
                    raise RuntimeError(PYTORCH_EXTENSION_MISSING)
            packages = (["torch and torchvision (through the PyTorch extension)"] if needTorch else []) + missing
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "BrainAge needs these Python packages, which will be downloaded and installed now "
                    "(this can take several minutes):\n\n" + "\n".join(packages), "BrainAge: install packages"):
                raise RuntimeError("BrainAge cannot run without its Python packages: " + ", ".join(packages))
            if needTorch:
                self.log("Installing PyTorch...")
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    raise RuntimeError("PyTorch could not be installed. " + PYTORCH_EXTENSION_MISSING)
            if missing:
                self.log("Installing " + ", ".join(missing) + "...")
                slicer.util.pip_install(" ".join(missing))
        self._requirementsReady = True

    def cudaAvailable(self):
        """True/False once torch is imported; None (unknown) before, to keep the GUI light."""
        torch = sys.modules.get("torch")
        return bool(torch.cuda.is_available()) if torch else None

    def loadModel(self, model="demo"):
        """A BrainAge model by name ("demo"), file path, or https URL (downloaded once)."""
        from BrainAgeLib.atomic_files import atomic_path
        from BrainAgeLib.model.checkpoint import load_model
        from BrainAgeLib.slicer_bridge import model_download_path

        if model not in self._models:
            source = model
            if model.lower().startswith("https://"):
                source = model_download_path(model)
                if not os.path.exists(source):  # download beside it; moved into place only once complete
                    os.makedirs(os.path.dirname(source), exist_ok=True)
                    self.log(f"Downloading {model}...")
                    with atomic_path(source) as partial:
                        os.remove(partial)  # downloadFile keeps an existing non-empty file
                        if not slicer.util.downloadFile(model, str(partial)):
                            raise RuntimeError(f"Could not download the model {model}")
            self.log(f"Loading model {model}...")
            self._models[model] = load_model(source)
        return self._models[model]

    def volumeFromNode(self, volumeNode):
        """The node's voxels as a validated BrainAgeLib Volume (a copy), where Slicer shows them:
        a linear parent transform is applied to its IJKToRAS; a non-linear one must be hardened."""
        from BrainAgeLib.io import validate_volume
        from BrainAgeLib.slicer_bridge import volume_from_kji

        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        parent = volumeNode.GetParentTransformNode()
        parentToWorld = None
        if parent is not None:
            try:
                parentToWorld = slicer.util.arrayFromTransformMatrix(parent, toWorld=True)
            except Exception:
                raise ValueError(f"{volumeNode.GetName()} is under the non-linear transform {parent.GetName()}: "
                                 "harden the transform (Data module, right-click > Harden transform) first")
        volume = volume_from_kji(slicer.util.arrayFromVolume(volumeNode), slicer.util.arrayFromVTKMatrix(ijkToRas),
                                 parentToWorld)
        return validate_volume(volume, path=volumeNode.GetName())

    def estimate(self, model, volume, sex, chronologicalAge=None, device="auto", progress=None):
        """The prediction with its attention map. Touches no MRML node: safe in a worker thread."""
        from BrainAgeLib.inference import predict

        return predict(model, volume, sex, age=chronologicalAge, explain=True, device=device, progress=progress)

    def process(self, inputVolumeNode, sex, chronologicalAge=None, outputLabelmapNode=None, device="auto",
                model="demo", outputAttentionVolumeNode=None, progress=None):
        """Estimate brain age of a volume node (blocking) and show the attention labelmap over it.

        sex: "F", "M" or "unknown"; chronologicalAge: years or None. A new labelmap node is made
        when outputLabelmapNode is None; outputAttentionVolumeNode, when given, receives the scalar
        attention map; the brain mask goes to the labelmap "<input> brain mask". Returns the
        BrainAgeLib Result (predicted_age, brain_age_gap, qc, ...).
        """
        if not inputVolumeNode:
            raise ValueError("No input volume")
        self.setupPythonRequirements()
        volume = self.volumeFromNode(inputVolumeNode)
        result = self.estimate(self.loadModel(model), volume, sex, chronologicalAge, device, progress)
        self.showResult(result, inputVolumeNode, outputLabelmapNode, outputAttentionVolumeNode)
        self.log(result.summary())
        return result

    def processFiles(self, pathsOrCohortCsv, outputDir, model="demo", explain=False, device="auto", progress=None):
        """Batch: the volumes of a list of files, a folder or a cohort CSV/TSV -> outputDir/predictions.csv
        (resumable). Runs in Slicer's own process (workers=0): multiprocessing workers would start Slicer's
        executable, not Python."""
        self.setupPythonRequirements()
        from BrainAgeLib.cohort.batch import run_batch

        return run_batch(pathsOrCohortCsv, outputDir, model=self.loadModel(model), explain=explain, device=device,
                         workers=0, progress=progress)

    def showResult(self, result, inputVolumeNode, outputLabelmapNode=None, outputAttentionVolumeNode=None,
                   opacity=0.6, showBrainMask=False):
        """Put the attention labelmap (with its colour table) and the brain mask (labelmap "<input> brain mask",
        1 = brain, reused on a rerun) on the input's grid; the slice views show the mask when showBrainMask, else
        the attention labelmap, over the input. Returns (attention labelmap, brain mask); None where not in result."""
        from BrainAgeLib.explain.labelmap import attention_labelmap
        from BrainAgeLib.slicer_bridge import label_layer_node

        maskNode = labelmapNode = None
        if result.brain_mask is not None:
            name = inputVolumeNode.GetName() + BRAIN_MASK_SUFFIX
            maskNode = slicer.util.getFirstNodeByClassByName("vtkMRMLLabelMapVolumeNode", name)
            if maskNode is None:
                maskNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
            self.updateVolumeNode(maskNode, result.brain_mask, inputVolumeNode)
        if result.attention is not None:
            labelmap = attention_labelmap(result, levels=ATTENTION_LEVELS)
            labelmapNode = outputLabelmapNode if outputLabelmapNode is not None else slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLLabelMapVolumeNode", inputVolumeNode.GetName() + " attention")
            self.updateVolumeNode(labelmapNode, labelmap.volume, inputVolumeNode)
            labelmapNode.GetDisplayNode().SetAndObserveColorNodeID(self.colorTableNode(labelmap.colors).GetID())
            if outputAttentionVolumeNode is not None:
                self.updateVolumeNode(outputAttentionVolumeNode, result.attention, inputVolumeNode)
        shown = label_layer_node(showBrainMask, labelmapNode, maskNode)
        if shown is not None:
            slicer.util.setSliceViewerLayers(background=inputVolumeNode, label=shown, labelOpacity=opacity)
        return labelmapNode, maskNode

    def updateVolumeNode(self, volumeNode, volume, referenceNode):
        """Fill volumeNode with the voxels of a Volume on referenceNode's grid, with that node's
        geometry and under its parent transform, so the two overlap wherever the reference is."""
        from BrainAgeLib.slicer_bridge import kji_from_volume

        arrayKji, _ = kji_from_volume(volume)
        if tuple(arrayKji.shape) != tuple(slicer.util.arrayFromVolume(referenceNode).shape):
            raise ValueError(f"the map's grid {arrayKji.shape} is not the grid of {referenceNode.GetName()}")
        ijkToRas = vtk.vtkMatrix4x4()
        referenceNode.GetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(volumeNode, arrayKji)
        volumeNode.SetIJKToRASMatrix(ijkToRas)
        parentTransform = referenceNode.GetParentTransformNode()
        volumeNode.SetAndObserveTransformNodeID(parentTransform.GetID() if parentTransform else None)
        volumeNode.CreateDefaultDisplayNodes()

    def colorTableNode(self, colors):
        """The scene's BrainAge attention colour table, (re)filled with colors."""
        from BrainAgeLib.slicer_bridge import color_table_rows

        colorNode = slicer.mrmlScene.GetFirstNodeByName(COLOR_TABLE_NAME)
        if colorNode is None:
            colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(False)
        count, rows = color_table_rows(colors)
        colorNode.SetNumberOfColors(count)
        colorNode.GetLookupTable().SetTableRange(0, count - 1)
        colorNode.SetNamesInitialised(True)
        for index, name, r, g, b, a in rows:
            colorNode.SetColor(index, name, r, g, b, a)
        return colorNode


class BrainAgeTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_head()

    def test_phantom_head(self):
        import math

        import numpy as np
        from BrainAgeLib.slicer_bridge import QC_NO_FLAGS, kji_from_volume, phantom_head, result_text

        self.delayDisplay("Building a phantom head")
        logic = BrainAgeLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        arrayKji, ijkToRas = kji_from_volume(phantom_head())  # no download: made from numpy/MNI
        inputNode = slicer.util.addVolumeFromArray(arrayKji, ijkToRAS=ijkToRas, name="BrainAgePhantom")
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "BrainAgePhantom attention")

        self.delayDisplay("Estimating brain age with the demo model")
        result = logic.process(inputNode, "F", chronologicalAge=70.0, outputLabelmapNode=labelmapNode, device="cpu")

        self.assertTrue(math.isfinite(result.predicted_age))
        self.assertTrue(math.isfinite(result.brain_age_gap))
        self.assertTrue(result.model_is_demo)
        labels = slicer.util.arrayFromVolume(labelmapNode)
        self.assertEqual(labels.shape, slicer.util.arrayFromVolume(inputNode).shape)
        self.assertEqual(int(labels.max()), ATTENTION_LEVELS)
        maskNode = slicer.util.getFirstNodeByClassByName("vtkMRMLLabelMapVolumeNode", "BrainAgePhantom" + BRAIN_MASK_SUFFIX)
        mask = slicer.util.arrayFromVolume(maskNode)  # fails when there is no mask node
        self.assertEqual(mask.shape, labels.shape)
        self.assertEqual(int(mask.max()), 1)
        self.assertAlmostEqual(  # the mask shown is the one quality control measured
            float(mask.sum()) * float(np.prod(result.brain_mask.spacing)) / 1000.0, result.qc.brain_volume_ml, delta=0.5)
        inputMatrix, labelMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(inputMatrix)
        for node in (labelmapNode, maskNode):
            node.GetIJKToRASMatrix(labelMatrix)
            np.testing.assert_allclose(
                slicer.util.arrayFromVTKMatrix(labelMatrix), slicer.util.arrayFromVTKMatrix(inputMatrix), atol=1e-4)
        text = result_text(result)  # what the results panel shows
        self.assertIn(f"{result.qc.brain_volume_ml:.0f} ml", text)
        self.assertEqual(text.count("QC flag:"), len(result.qc.flags))
        self.assertEqual(QC_NO_FLAGS in text, not result.qc.flags)
        colorNode = labelmapNode.GetDisplayNode().GetColorNode()
        self.assertIsNotNone(colorNode)
        self.assertEqual(colorNode.GetName(), COLOR_TABLE_NAME)
        self.assertEqual(colorNode.GetNumberOfColors(), ATTENTION_LEVELS + 1)
        self.delayDisplay("Test passed")

