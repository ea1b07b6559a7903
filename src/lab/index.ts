/**
 * kvmmem/lab: whole deployments to develop and test against. `ModelLab` runs
 * one in this process on the hypercall model: the tool's IntrospectionServer,
 * a model host with its VMs connected over real sockets, sessions on the model
 * /dev/kvmmem.
 */
export { ModelLab, type LabOptions, type LabVm, type LabVmSpec } from './model-lab.js';
