"""BrainAge: brain age and its attention map from one T1-weighted MRI, in 3D Slicer.

The module is a thin layer over BrainAgeLib (the Slicer-independent library beside it): the
widget gathers inputs and shows results, the logic converts MRML nodes to and from
BrainAgeLib Volumes (BrainAgeLib.slicer_bridge) and runs the model. Batch use from Slicer's
Python console:

    logic = slicer.util.getModuleLogic("BrainAge")
    result = logic.process(getNode("MRHead"), sex="F", chronologicalAge=63)
    logic.processFiles("/data/cohort.csv", "/data/brainage-out")

The Estimate button runs the model in a background process (BrainAgeLib.slicer_worker, started
with PythonSlicer) so Slicer stays responsive and Cancel can stop it at once; process() with
waitForCompletion=False does the same from the console.
"""
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# Installed, BrainAgeLib sits beside this file; in a source checkout it is one folder up. Appended once.
_moduleDir = os.path.dirname(os.path.abspath(__file__))
_libraryParent = _moduleDir if os.path.isdir(os.path.join(_moduleDir, "BrainAgeLib")) else os.path.dirname(_moduleDir)
if _libraryParent not in sys.path:
    sys.path.append(_libraryParent)

from BrainAgeLib.slicer_bridge import AGE_RANGE, DEVICES, EXPLAIN_CHOICES, MODEL_CHOICES, SEX_CHOICES  # noqa: E402 (numpy only)

POLL_INTERVAL_MS = 100  # how often the GUI reads the worker process's progress lines
ATTENTION_LEVELS = 10
COLOR_TABLE_NAME = "BrainAgeAttention"
BRAIN_MASK_SUFFIX = " brain mask"  # the brain mask labelmap is named "<input> brain mask"
CONTRIBUTORS = ["BrainAge developers (BrainAge project)"]  # = EXTENSION_CONTRIBUTORS in ../CMakeLists.txt
PYTORCH_EXTENSION_MISSING = (
    "BrainAge needs the PyTorch extension to install torch. Install 'PyTorch' from the "
    "Extensions Manager, restart Slicer, and try again.")


class BrainAge(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Brain Age"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = CONTRIBUTORS
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
and tests the software; its ages, gaps and maps mean nothing clinically. For research use choose the
authors' published BrainRotViT (trained on real scans; downloaded once) or a model file or https URL, and
<b>Save report</b> writes the result as one HTML file. No model here is a medical device.
"""
        self.parent.acknowledgementText = """
BrainAge implements BrainRotViT: Jalal, Rahman, Rahman &amp; Rahman (2025), "BrainRotViT",
<a href="https://arxiv.org/abs/2511.15188">arXiv:2511.15188</a>. Bias correction after de Lange &amp; Cole
(2020), NeuroImage: Clinical 26:102229. Module layout after lassoan's SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg.
"""


@parameterNodeWrapper
class BrainAgeParameterNode:
    """The panel's inputs and outputs, saved with the scene. logic.process() writes its inputs here, so a
    call from the Python console shows in the GUI. Choices are BrainAgeLib.slicer_bridge's."""

    inputVolume: vtkMRMLScalarVolumeNode
    sex: Annotated[str, Choice(SEX_CHOICES)] = "unknown"
    chronologicalAge: Annotated[float, WithinRange(*AGE_RANGE)] = 0.0  # 0 = not given
    modelChoice: Annotated[str, Choice(list(MODEL_CHOICES))] = next(iter(MODEL_CHOICES))
    modelLocation: str = ""  # the file or https URL of the "file or URL" choice
    device: Annotated[str, Choice(DEVICES)] = "auto"
    explainMethod: Annotated[str, Choice(EXPLAIN_CHOICES)] = "paper"
    outputLabelmap: vtkMRMLLabelMapVolumeNode
    outputAttention: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    showBrainMask: bool = False


class BrainAgeWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainAge.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BrainAgeLogic()
        self.logic.logCallback = self.showStatus
        self.job = None  # the WorkerMonitor of the estimate or download running in the background
        self.shownLabelmaps = (None, None)  # (attention labelmap, brain mask) of the last result
        self.starting = False  # True while packages install / the worker starts
        self._parameterNode = self._parameterNodeGuiTag = self._parameterObserver = None

        self.ui.modelLocationPathLineEdit.connect("currentPathChanged(QString)", self.onModelLocationChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.showBrainMaskCheckBox.connect("toggled(bool)", self.onShowBrainMask)
        self.ui.estimateButton.connect("clicked(bool)", self.onEstimate)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.sceneObservers = [slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose),
                               slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)]
        self.setRunning(False)
        self.initializeParameterNode()

    def cleanup(self):
        if self.job:  # the worker must not outlive the panel: stop it and clean up while the widgets exist
            self.job.cancel()
            self.job.poll_until_finished(0.05)
        self.logic.forgetLastEstimate()
        for tag in self.sceneObservers:
            slicer.mrmlScene.RemoveObserver(tag)
        self.setParameterNode(None)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        """Reload BrainAgeLib too: Slicer's Reload re-reads only this file."""
        from BrainAgeLib.slicer_bridge import forget_library_modules

        forget_library_modules()  # Slicer's reload calls cleanup() on this widget first
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        parameters = self.logic.getParameterNode()
        if not parameters.inputVolume:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameters)

    def setParameterNode(self, parameters):
        """Connect the panel to a parameter node (None: disconnect)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNode.RemoveObserver(self._parameterObserver)
        self._parameterNode = parameters
        if parameters:
            self._parameterNodeGuiTag = parameters.connectGui(self.ui)
            self._parameterObserver = parameters.AddObserver(vtk.vtkCommand.ModifiedEvent, self.updateEstimateButton)
            self.updateEstimateButton()

    def inputs(self):
        """The form (the parameter node) as the arguments of BrainAgeLogic.process."""
        from BrainAgeLib.slicer_bridge import model_argument

        parameters = self._parameterNode
        age = parameters.chronologicalAge
        return {
            "inputVolumeNode": parameters.inputVolume,
            "sex": parameters.sex,
            "chronologicalAge": age if age > 0 else None,  # 0 shows as "(not given)"
            "model": model_argument(parameters.modelChoice, parameters.modelLocation),
            "device": parameters.device,
            "explainMethod": parameters.explainMethod,
        }

    def onModelLocationChanged(self, path):
        if self._parameterNode and self._parameterNode.modelLocation != path:
            self._parameterNode.modelLocation = path

    def updateEstimateButton(self, *unused):
        from BrainAgeLib.slicer_bridge import check_inputs, model_needs_download, model_status_html

        if self._parameterNode is None:
            return
        inputs, parameters = self.inputs(), self._parameterNode
        if self.ui.modelLocationPathLineEdit.currentPath != parameters.modelLocation:
            self.ui.modelLocationPathLineEdit.currentPath = parameters.modelLocation
        self.ui.modelLocationPathLineEdit.enabled = MODEL_CHOICES[parameters.modelChoice] is None
        self.ui.modelStatusLabel.text = model_status_html(inputs["model"])
        needsDownload = model_needs_download(inputs["model"])
        idle = self.job is None and not self.starting
        self.ui.downloadModelButton.visible = needsDownload
        self.ui.downloadModelButton.enabled = needsDownload and idle
        node = inputs["inputVolumeNode"]
        imageData = node.GetImageData() if node else None
        attentionNode = parameters.outputAttention
        problems = check_inputs(
            imageData.GetDimensions() if imageData else None, inputs["sex"], inputs["chronologicalAge"],
            inputs["model"], inputs["device"], self.logic.cudaAvailable(),
            attention_output_is_input=node is not None and attentionNode is not None and attentionNode.GetID() == node.GetID(),
            components=imageData.GetNumberOfScalarComponents() if imageData else 1)
        if needsDownload:
            problems.append("Download the model first (Download model), or choose another model.")
        self.ui.estimateButton.enabled = not problems and idle
        self.ui.estimateButton.toolTip = "\n".join(problems) or "Estimate the brain age of the selected volume."
        self.ui.saveReportButton.enabled = self.logic.lastEstimate is not None and idle
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

    def startJob(self, start):
        """Run start() (it installs what is missing, then returns the WorkerMonitor of a background job)."""
        if self.starting or self.job is not None:
            return  # pip output processes events while installing: a second click lands here
        self.starting = True
        self.updateEstimateButton()
        try:
            with slicer.util.tryWithErrorDisplay("Could not start BrainAge's background process.", waitCursor=True):
                self.logic.setupPythonRequirements()
                self.job = start()
                self.setRunning(True)
        finally:
            self.starting = False
            self.updateEstimateButton()

    def onEstimate(self):
        self.ui.resultsTextBrowser.setHtml("")
        parameters = self._parameterNode
        self.startJob(lambda: self.logic.process(
            **self.inputs(), outputLabelmapNode=parameters.outputLabelmap, outputAttentionVolumeNode=parameters.outputAttention,
            opacity=parameters.opacity, showBrainMask=parameters.showBrainMask, progress=self.onProgress,
            waitForCompletion=False, completedCallback=self.onEstimateDone))

    def onDownloadModel(self):
        texts = ("Download cancelled; the next one resumes where it stopped.", "The model could not be downloaded.",
                 "Model downloaded: it is used offline from now on.")
        self.startJob(lambda: self.logic.downloadModel(self.inputs()["model"], progress=self.onProgress, waitForCompletion=False,
                                                       completedCallback=lambda error: self.jobDone(error, *texts)))

    def onSaveReport(self):
        path = qt.QFileDialog.getSaveFileName(None, "Save brain age report", f"{self.logic.lastEstimate[2]}_brainage.html",
                                              "HTML report (*.html)")
        texts = ("Cancelled.", "The report could not be saved.", f"Report saved: {path}")
        if path:
            self.startJob(lambda: self.logic.saveReport(path, progress=self.onProgress, waitForCompletion=False,
                                                        completedCallback=lambda error: self.jobDone(error, *texts)))

    def onCancel(self):
        if self.job:
            self.ui.cancelButton.enabled = False
            self.showStatus("Cancelling...")
            with slicer.util.tryWithErrorDisplay("Could not stop BrainAge's background process."):
                self.job.cancel()

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        if self.job is None or not self.job.cancelled:
            self.showStatus(message)

    def endJob(self):
        """The background job ended: True when it was cancelled."""
        cancelled = self.job is not None and self.job.cancelled
        self.job = None
        self.setRunning(False)
        return cancelled

    def jobDone(self, error, cancelledText, failedText, doneText):
        """A download or report job ended: the status says how; a failure also in a message box."""
        if self.endJob():
            self.showStatus(cancelledText)
        elif error:
            self.showStatus(failedText)
            slicer.util.errorDisplay(f"{failedText}\n\n{error}")
        else:
            self.showStatus(doneText)
        self.updateEstimateButton()

    def onEstimateDone(self, result, shownLabelmaps, error):
        """The background estimate ended: result and labelmaps shown, or why not (error)."""
        from BrainAgeLib.slicer_bridge import result_text

        if self.endJob():
            self.showStatus("Cancelled.")
        elif error:
            self.showStatus("Brain age estimation failed.")
            slicer.util.errorDisplay("Brain age estimation failed.\n\n" + error)
        else:
            self.shownLabelmaps = shownLabelmaps
            self.logic.getParameterNode().outputLabelmap = shownLabelmaps[0]  # the panel may be disconnected now
            self.ui.resultsTextBrowser.setHtml(result_text(result))
            self.showStatus(f"Done in {result.timings.get('total', 0.0):.1f} s.")
            self.updateEstimateButton()

    def onOpacityChanged(self, opacity):
        """The slider sets the label layer's opacity only in views whose label layer is a BrainAge labelmap."""
        ours = {node.GetID() for node in self.shownLabelmaps if node is not None and slicer.mrmlScene.IsNodePresent(node)}
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if composite.GetLabelVolumeID() in ours:
                composite.SetLabelOpacity(opacity)

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
        self.lastEstimate = None  # (folder, model, input name) of the last background estimate, for saveReport

    def log(self, text):
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    def getParameterNode(self):
        return BrainAgeParameterNode(super().getParameterNode())

    def showInputs(self, inputVolumeNode, sex, chronologicalAge, model, device, explainMethod):
        """Write a call's inputs to the parameter node, so that the panel shows what ran."""
        from BrainAgeLib.slicer_bridge import panel_values

        parameters = self.getParameterNode()
        wasModifying = parameters.StartModify()
        try:
            parameters.inputVolume, parameters.device, parameters.explainMethod = inputVolumeNode, device, explainMethod
            for name, value in panel_values(sex, chronologicalAge, model).items():
                setattr(parameters, name, value)
        finally:
            parameters.EndModify(wasModifying)

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing, after one confirmation: torch through PyTorchUtils, the rest through pip
        at their floors (BrainAgeLib.slicer_bridge.PIP_REQUIREMENTS); what no install fixes (too old a Slicer,
        Python or torch) is an error saying what to do."""
        if self._requirementsReady:
            return
        from BrainAgeLib.slicer_bridge import (TORCH_REQUIREMENT, environment_problems, installed_version,
                                               missing_requirements, torch_missing)

        problems = environment_problems(installed_version)
        if problems:
            raise RuntimeError("\n".join(problems))
        needTorch = torch_missing(installed_version)
        if needTorch:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(PYTORCH_EXTENSION_MISSING)
        torchNote = ["torch and torchvision (through the PyTorch extension)"] if needTorch else []
        self.installPackages(missing_requirements(installed_version), "BrainAge cannot run", askConfirmation, torchNote)
        if needTorch:
            self.log("Installing PyTorch...")
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError("PyTorch could not be installed. " + PYTORCH_EXTENSION_MISSING)
        self._requirementsReady = True

    def installPackages(self, missing, withoutThem, askConfirmation=True, alsoListed=()):
        """pip-install the specs in missing after one confirmation (listing alsoListed too, installed by the
        caller); no internet gives the offline route. withoutThem: what the refusal message says happens."""
        from BrainAgeLib.slicer_bridge import offline_install_message

        packages = list(alsoListed) + list(missing)
        if not packages:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "BrainAge needs these Python packages, which will be downloaded and installed now "
                "(this can take several minutes):\n\n" + "\n".join(packages), "BrainAge: install packages"):
            raise RuntimeError(f"{withoutThem} without these Python packages: " + ", ".join(packages))
        if missing:
            self.log("Installing " + ", ".join(missing) + "...")
            try:
                slicer.util.pip_install(" ".join(missing))
            except Exception as error:  # no internet, a proxy, a full disk: say what to do instead
                raise RuntimeError(offline_install_message(missing, error)) from error

    def cudaAvailable(self):
        """True/False once torch is imported; None (unknown) before, to keep the GUI light."""
        torch = sys.modules.get("torch")
        return bool(torch.cuda.is_available()) if torch else None

    def modelFile(self, model="demo"):
        """A registered name or a file path as it is; an https URL downloaded once, to BrainAge's cache."""
        from BrainAgeLib.atomic_files import atomic_path
        from BrainAgeLib.slicer_bridge import model_download_path

        if not model.lower().startswith("https://"):
            return model
        source = model_download_path(model)
        if not os.path.exists(source):  # download beside it; moved into place only once complete
            os.makedirs(os.path.dirname(source), exist_ok=True)
            self.log(f"Downloading {model}...")
            with atomic_path(source) as partial:
                os.remove(partial)  # downloadFile keeps an existing non-empty file
                if not slicer.util.downloadFile(model, str(partial)):
                    raise RuntimeError(f"Could not download the model {model}")
        return source

    def loadModel(self, model="demo", progress=None):
        """A BrainAge model by registered name (fetched on first use, with progress), file path, or https URL."""
        from BrainAgeLib.model.checkpoint import load_model

        if model not in self._models:
            source = self.modelFile(model)
            self.log(f"Loading model {model}...")
            self._models[model] = load_model(source, progress=progress)
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

    def process(self, inputVolumeNode, sex, chronologicalAge=None, outputLabelmapNode=None, device="auto",
                model="demo", outputAttentionVolumeNode=None, progress=None, waitForCompletion=True,
                completedCallback=None, opacity=0.6, showBrainMask=False, explainMethod="paper"):
        """Estimate brain age of a volume node and show the attention labelmap over it.

        sex: "F", "M", "female", "male" or "unknown"; chronologicalAge: years or None; model: a registered name
        ("brainrotvit", fetched on first use; "demo"), a file or an https URL; explainMethod: "paper" or
        "relevance" (BrainAgeLib.explain.methods). A new labelmap node "<input> attention (<method>)" is made
        when outputLabelmapNode is None; outputAttentionVolumeNode, when given, receives the scalar
        attention map; the brain mask goes to the labelmap "<input> brain mask". progress(fraction,
        message) reports the steps. Blocking (in Slicer's process), returns the BrainAgeLib Result
        (predicted_age, brain_age_gap, qc, ...). With waitForCompletion=False the model runs in a
        background process and this returns its WorkerMonitor at once (.cancel() stops it); when it
        ends, the nodes are filled and completedCallback(result, (labelmapNode, maskNode), error)
        is called on the GUI thread (error: None, or why there is no result).
        """
        if not inputVolumeNode:
            raise ValueError("No input volume")
        try:
            self.showInputs(inputVolumeNode, sex, chronologicalAge, model, device, explainMethod)
        except ValueError:
            pass  # a value the panel cannot show (device "cuda:1", a bad age): the library checks it below
        self.setupPythonRequirements()
        volume = self.volumeFromNode(inputVolumeNode)
        show = lambda result, labelmap=None: self.showResult(  # noqa: E731
            result, inputVolumeNode, outputLabelmapNode, outputAttentionVolumeNode, opacity, showBrainMask, labelmap)
        if not waitForCompletion:
            return self.startEstimate(volume, sex, chronologicalAge, model, device, inputVolumeNode, show, progress,
                                      completedCallback, explainMethod)
        from BrainAgeLib.inference import predict  # torch enters Slicer's process only on this blocking path

        result = predict(self.loadModel(model, progress), volume, sex, age=chronologicalAge, explain=explainMethod, device=device,
                         progress=progress)
        show(result)
        self.log(result.summary())
        return result

    def startEstimate(self, volume, sex, chronologicalAge, model, device, inputVolumeNode, show, progress,
                      completedCallback, explainMethod="paper"):
        """process(waitForCompletion=False): the input to a temporary folder, the worker started on it."""
        from BrainAgeLib.io import save_volume
        from BrainAgeLib.worker_protocol import INPUT_FILE, load_worker_result, worker_command, worker_python

        workDir = tempfile.mkdtemp(prefix="BrainAge-")
        try:
            inputPath = str(save_volume(volume, os.path.join(workDir, INPUT_FILE)))
            modelSource = self.modelFile(model)
            command = worker_command(worker_python(), inputPath, workDir, sex, chronologicalAge,
                                     modelSource, device, explain=explainMethod, levels=ATTENTION_LEVELS)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

        def finished(monitor):
            result, shown, error = None, (None, None), monitor.failure()
            try:
                if error is None and not slicer.mrmlScene.IsNodePresent(inputVolumeNode):
                    error = "the input volume was removed while the estimate ran; nothing to show"
                if error is None:
                    result, labelmap = load_worker_result(workDir)
                    shown = show(result, labelmap)
                    self.log(result.summary())
            except Exception as exception:
                logging.exception("BrainAge could not show the result")
                error = str(exception)
            finally:
                self.forgetLastEstimate()
                if error is None:  # kept for saveReport until the next estimate
                    self.lastEstimate = (workDir, modelSource, inputVolumeNode.GetName())
                else:
                    shutil.rmtree(workDir, ignore_errors=True)
            if completedCallback:
                completedCallback(result, shown, error)

        return self.runWorker(command, progress, finished)

    def forgetLastEstimate(self):
        """Delete the folder the last background estimate left for saveReport."""
        if self.lastEstimate:
            shutil.rmtree(self.lastEstimate[0], ignore_errors=True)
        self.lastEstimate = None

    def saveReport(self, path, progress=None, waitForCompletion=True, completedCallback=None):
        """The HTML report (BrainAgeLib.report: numbers with interval and z, the subject against the model's
        reference set, QC and attention pictures, model card) of the last background estimate, to path; written
        by a worker. Installs matplotlib and jinja2 on first use (after one confirmation). Blocking: raises
        RuntimeError when it failed; with waitForCompletion=False returns the WorkerMonitor."""
        from BrainAgeLib.slicer_bridge import REPORT_REQUIREMENTS, installed_version, missing_requirements
        from BrainAgeLib.worker_protocol import report_command, worker_python

        if not self.lastEstimate:
            raise ValueError("No estimate to report on yet: run Estimate Brain Age first.")
        self.setupPythonRequirements()
        self.installPackages(missing_requirements(installed_version, REPORT_REQUIREMENTS), "Reports cannot be saved")
        workDir, model, subject = self.lastEstimate
        return self.runJob(report_command(worker_python(), workDir, path, model, subject), progress, waitForCompletion,
                           completedCallback, "BrainAge could not save the report")

    def downloadModel(self, model="brainrotvit", progress=None, waitForCompletion=True, completedCallback=None):
        """Fetch a registered model (the published BrainRotViT) into BrainAge's cache in a background process,
        with progress(fraction, message); a cancelled download resumes next time. Blocking: raises RuntimeError
        when it failed. With waitForCompletion=False returns the WorkerMonitor; completedCallback(error or None)."""
        from BrainAgeLib.worker_protocol import download_command, worker_python

        self.setupPythonRequirements()
        return self.runJob(download_command(worker_python(), model), progress, waitForCompletion, completedCallback,
                           f"BrainAge could not download {model}")

    def processFiles(self, pathsOrCohortCsv, outputDir, model="demo", explain=False, device="auto", progress=None,
                     waitForCompletion=True, completedCallback=None):
        """Batch: the volumes of a list of files, a folder or a cohort CSV/TSV -> outputDir/predictions.csv
        (resumable), in a background process whose multiprocessing workers prepare the next subjects;
        explain: False, True (the paper's maps) or "relevance". Blocking: returns the path of predictions.csv, raises RuntimeError when the run failed. With
        waitForCompletion=False returns the WorkerMonitor; completedCallback(error or None) at the end."""
        from BrainAgeLib.worker_protocol import batch_command, worker_python

        self.setupPythonRequirements()
        command = batch_command(worker_python(), pathsOrCohortCsv, outputDir, self.modelFile(model), device, explain)
        monitor = self.runJob(command, progress, waitForCompletion, completedCallback, "BrainAge batch failed")
        return os.path.join(outputDir, "predictions.csv") if waitForCompletion else monitor

    def runJob(self, command, progress, waitForCompletion, completedCallback, failureText):
        """runWorker for a job whose outcome is an error or None: blocking, raises RuntimeError(failureText: why)
        when it failed; else returns the WorkerMonitor and calls completedCallback(error or None) at the end."""
        monitor = self.runWorker(command, progress, completedCallback and (lambda job: completedCallback(job.failure())),
                                 waitForCompletion)
        if waitForCompletion and monitor.failure():
            raise RuntimeError(f"{failureText}: {monitor.failure()}")
        return monitor

    def runWorker(self, command, progress=None, finished=None, waitForCompletion=False):
        """Start a BrainAgeLib worker command (slicer.util.launchConsoleProcess, stdout and stderr merged): its
        progress lines go to progress(fraction, message), other output to the log, then finished(monitor).
        A QTimer polls it; with waitForCompletion this waits for the end instead."""
        from BrainAgeLib.worker_protocol import WorkerMonitor, library_parent

        logging.info("BrainAge worker: " + " ".join(command))
        process = slicer.util.launchConsoleProcess(command, useStartupEnvironment=False, cwd=library_parent())
        monitor = WorkerMonitor(process, progress, logging.info, finished)
        if waitForCompletion:
            monitor.poll_until_finished(POLL_INTERVAL_MS / 1000.0)
            return monitor
        monitor.poller = qt.QTimer()
        monitor.poller.setInterval(POLL_INTERVAL_MS)
        monitor.poller.connect("timeout()", lambda: monitor.poll() and monitor.poller.stop())
        monitor.poller.start()
        return monitor

    def showResult(self, result, inputVolumeNode, outputLabelmapNode=None, outputAttentionVolumeNode=None,
                   opacity=0.6, showBrainMask=False, labelmap=None):
        """Put the attention labelmap (with its colour table; labelmap: one made already, e.g. by the worker) and
        the brain mask (labelmap "<input> brain mask", 1 = brain, reused on a rerun) on the input's grid; the slice
        views show the mask when showBrainMask, else the attention labelmap, over the input. Returns (attention
        labelmap, brain mask); None where not in result."""
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
            labelmap = labelmap or attention_labelmap(result, levels=ATTENTION_LEVELS)
            name = f"{inputVolumeNode.GetName()} attention ({result.explain_method or 'paper'})"
            labelmapNode = outputLabelmapNode or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
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

        colorNode = slicer.mrmlScene.GetFirstNode(COLOR_TABLE_NAME, "vtkMRMLColorTableNode")
        if colorNode is None:
            colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(False)
        count, rows = color_table_rows(colors)
        colorNode.SetNumberOfColors(count)
        colorNode.GetLookupTable().SetTableRange(0, count - 1)
        for index, name, r, g, b, a in rows:
            colorNode.SetColor(index, name, r, g, b, a)
        return colorNode


class BrainAgeTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """The panel and parameter node always; the model (blocking and in the background process) only when
        BrainAge's packages are installed already or BRAINAGE_SELFTEST_INSTALL=1: a build machine installs nothing."""
        from BrainAgeLib.slicer_bridge import installed_version, missing_requirements, selftest_inference_allowed, torch_missing

        self.setUp()
        self.test_console_call_shows_in_the_panel()
        allowed, reason = selftest_inference_allowed(missing_requirements(installed_version), torch_missing(installed_version))
        self.delayDisplay(f"BrainAge self-test: {reason}")
        if allowed:
            self.test_phantom_head()
            self.test_background_worker()

    def test_console_call_shows_in_the_panel(self):
        from BrainAgeLib.slicer_bridge import kji_from_volume, phantom_head

        slicer.util.selectModule("BrainAge")
        widget = slicer.util.getModuleWidget("BrainAge")
        arrayKji, ijkToRas = kji_from_volume(phantom_head(use_template=False))
        inputNode = slicer.util.addVolumeFromArray(arrayKji, ijkToRAS=ijkToRas, name="BrainAgePanelPhantom")
        widget.logic.showInputs(inputNode, "M", 63.5, "demo", "cpu", "relevance")  # what process() does first
        self.assertEqual(widget.ui.inputVolumeSelector.currentNode(), inputNode)
        self.assertEqual(widget.ui.sexComboBox.currentText, "male")
        self.assertAlmostEqual(widget.ui.chronologicalAgeSpinBox.value, 63.5)
        self.assertEqual(widget.ui.deviceComboBox.currentText, "cpu")
        self.assertEqual(widget.ui.explainMethodComboBox.currentText, "relevance")
        self.assertEqual(widget.inputs()["model"], "demo")
        self.assertTrue(widget.ui.estimateButton.enabled)
        widget.ui.sexComboBox.currentIndex = 0  # and the GUI writes the parameter node
        self.assertEqual(widget.logic.getParameterNode().sex, "female")

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

    def test_background_worker(self):
        """What Estimate does: the model in a background process, progress, the result back as nodes; Cancel."""
        from BrainAgeLib.slicer_bridge import kji_from_volume, phantom_head

        logic = BrainAgeLogic()
        arrayKji, ijkToRas = kji_from_volume(phantom_head())
        inputNode = slicer.util.addVolumeFromArray(arrayKji, ijkToRAS=ijkToRas, name="BrainAgeWorkerPhantom")

        def runInBackground(cancelAt=None):
            ended, fractions = [], []
            job = logic.process(inputNode, "F", 70.0, device="cpu", waitForCompletion=False,
                                progress=lambda fraction, message: fractions.append(fraction),
                                completedCallback=lambda *outcome: ended.append(outcome))
            for _ in range(600):  # at most 5 minutes
                if ended:
                    break
                if cancelAt is not None and fractions and fractions[-1] >= cancelAt and not job.cancelled:
                    job.cancel()
                slicer.util.delayDisplay("Estimating brain age in a background process", 500)
            self.assertTrue(ended, "the worker did not finish within 5 minutes")
            return job, fractions, ended[0]

        self.delayDisplay("Estimating in the background")
        job, fractions, (result, (labelmapNode, maskNode), error) = runInBackground()
        self.assertIsNone(error)
        self.assertEqual(fractions[-1], 1.0)
        self.assertEqual(fractions, sorted(fractions))
        blocking = logic.process(inputNode, "F", chronologicalAge=70.0, device="cpu")
        self.assertAlmostEqual(result.predicted_age, blocking.predicted_age, places=2)
        for node in (labelmapNode, maskNode):
            self.assertEqual(slicer.util.arrayFromVolume(node).shape, arrayKji.shape)
        self.assertEqual(int(slicer.util.arrayFromVolume(labelmapNode).max()), ATTENTION_LEVELS)
        from BrainAgeLib.slicer_bridge import REPORT_REQUIREMENTS, installed_version, missing_requirements

        if not missing_requirements(installed_version, REPORT_REQUIREMENTS):  # Save report, when it needs no install
            reportPath = os.path.join(tempfile.mkdtemp(prefix="BrainAgeTest-"), "report.html")
            logic.saveReport(reportPath)
            with open(reportPath, encoding="utf-8") as report:
                self.assertIn(f"{result.predicted_age:.1f}", report.read())

        self.delayDisplay("Cancelling a background estimate during preprocessing")
        job, fractions, (result, shown, error) = runInBackground(cancelAt=0.09)
        self.assertTrue(job.cancelled)
        self.assertIsNone(result)
        self.assertEqual(error, "cancelled by the user")
        self.assertIsNotNone(job.process.poll())
        self.delayDisplay("Test passed")
