"""In-Slicer test of the panel: a quick job on MRHead crops, driven through the widget.

Registered with slicer_add_python_unittest (runs inside Slicer with --testing). The job is
tiny (3 CPU iterations on 24x48x48 crops) so that it finishes in about a minute. Skipped,
saying why, where Slicer's Python lacks the backend's packages or MRHead cannot be downloaded.
"""

import pathlib
import time

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

TIMEOUT_SECONDS = 900


class SemiSupSegModuleTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_runs_a_job_and_shows_a_case()
        self.setUp()
        self.test_closing_the_scene_during_a_job_keeps_its_results()

    def _waitFor(self, condition, timeout=TIMEOUT_SECONDS):
        """Let Slicer's event loop run (the panel polls the backend from a QTimer)."""
        end = time.monotonic() + timeout
        while not condition():
            self.assertLess(time.monotonic(), end, "timed out")
            slicer.app.processEvents()
            time.sleep(0.05)

    def _panelWithSampleCases(self):
        """The module's widget and a job's worth of sample cases in its parameter node."""
        from SemiSupSeg import SemiSupSegLogic
        from SemiSupSegLib.sample_cases import addThresholdSegmentation, sampleCasesOrSkip

        _head, volumes = sampleCasesOrSkip(self, SemiSupSegLogic().requirements(), 3)
        slicer.util.selectModule("SemiSupSeg")
        widget = slicer.util.getModuleWidget("SemiSupSeg")
        p = widget.logic.getParameterNode()
        p.labeledVolumes = volumes[:2]
        p.labeledSegmentations = [addThresholdSegmentation(v) for v in volumes[:2]]
        p.unlabeledVolumes = volumes[2:]
        p.method = "supervised"
        p.preset = "custom"
        p.iterations = 3
        p.device = "cpu"
        p.extraSettings = "batch_size=1, checkpoint_every=0"
        p.outputFolder = pathlib.Path(slicer.util.tempDirectory("SemiSupSegModuleTest"))
        return widget, volumes

    def test_panel_runs_a_job_and_shows_a_case(self):
        widget, volumes = self._panelWithSampleCases()
        self.assertEqual(widget.ui.classesLabel.text, "Classes: 1 bright, 2 dark")
        self.assertEqual(widget.ui.labeledTable.rowCount, 2)
        self.assertTrue(widget.ui.applyButton.enabled)

        self.delayDisplay("Starting a job from the panel")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        self._waitFor(lambda: widget._watchedRunner is None)
        self.assertIn("Finished", widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.planLabel.text.startswith("Plan (cpu): "))
        self.assertIn("3 iterations; ", widget.ui.planLabel.text)  # the custom budget: yours
        self.assertEqual(widget.ui.resultsTable.rowCount, 1)
        self.assertEqual(widget.ui.applyButton.text, "Train and predict")

        self.delayDisplay("Reviewing the unlabeled case")
        widget.ui.resultsTable.selectRow(0)
        slicer.app.processEvents()
        loaded = widget.logic.currentCase
        self.assertIsNotNone(loaded)
        self.assertIs(loaded.volume, volumes[2])
        segmentation = loaded.segmentation.GetSegmentation()
        self.assertEqual(
            [
                segmentation.GetNthSegment(i).GetName()
                for i in range(segmentation.GetNumberOfSegments())
            ],
            ["bright", "dark"],
        )
        composite = (
            slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        )
        self.assertEqual(composite.GetForegroundVolumeID(), loaded.uncertainty.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), loaded.volume.GetID())

        widget.ui.acceptButton.click()
        self.assertTrue(widget.ui.retrainButton.enabled)
        self.assertEqual(widget.ui.labeledTable.rowCount, 3)  # two drawn, one accepted
        self.delayDisplay("Test passed")

    def test_closing_the_scene_during_a_job_keeps_its_results(self):
        widget, _volumes = self._panelWithSampleCases()
        outputFolder = widget.logic.getParameterNode().outputFolder
        widget.ui.applyButton.click()
        self.assertTrue(widget.logic.running)
        self.delayDisplay("Closing the scene while the job runs")
        slicer.mrmlScene.Clear()
        self.assertIsNone(widget.logic.currentCase)
        self.assertEqual(widget.logic.getParameterNode().outputFolder, outputFolder)
        self._waitFor(lambda: widget._watchedRunner is None)
        self.assertIn("Finished", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.resultsTable.rowCount, 1)
        self.delayDisplay("Test passed")
