# The decisions of OPA's sample k8s_node_selector (open-policy-agent/contrib), written for the
# bench in Rego v1 and answering admission.k8s.io/v1 with the request's uid:
#   - a Pod in a namespace whose agentpool label is known, with any nodeSelector: denied (403);
#   - a Pod without nodeSelector: patched with nodeSelector {agentpool: <pool>} when the
#     namespace has the label;
#   - anything else: allowed.
# Namespaces come from data.kubernetes.namespaces[name] (as kube-mgmt replicates them).
package system

main := {
	"apiVersion": "admission.k8s.io/v1",
	"kind": "AdmissionReview",
	"response": object.union({"uid": input.request.uid}, response),
}

default response := {"allowed": true}

response := {
	"allowed": false,
	"status": {"code": 403, "message": "Manually specifying NodeSelector not supported in this namespace."},
} if {
	is_pod
	pool_for_namespace(input.request.namespace)
	has_node_selector
} else := {
	"allowed": true,
	"patchType": "JSONPatch",
	"patch": base64.encode(json.marshal([{
		"op": "add",
		"path": "/spec/nodeSelector",
		"value": {"agentpool": pool_for_namespace(input.request.namespace)},
	}])),
} if {
	is_pod
	not has_node_selector
	pool_for_namespace(input.request.namespace)
}

is_pod if input.request.kind.kind == "Pod"

has_node_selector if count(input.request.object.spec.nodeSelector) > 0

pool_for_namespace(namespace) := data.kubernetes.namespaces[namespace].metadata.labels.agentpool
