{{/* The objects' name: the release's, with the chart's name added unless it holds it already. */}}
{{- define "pagedserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pagedserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pagedserve.image" -}}
{{- $device := ternary "gpu" "cpu" (gt (int .Values.gpus) 0) -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $device) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The modelConfig value, parsed, with the device and tensor-parallel settings of gpus and tensorParallelSize. */}}
{{- define "pagedserve.modelConfig" -}}
{{- $config := fromYaml .Values.modelConfig -}}
{{- if hasKey $config "Error" -}}
{{- fail (printf "modelConfig is not valid YAML: %s" $config.Error) -}}
{{- end -}}
{{- $gpus := int .Values.gpus -}}
{{- $size := int .Values.tensorParallelSize -}}
{{- if lt $size 1 -}}
{{- fail (printf "tensorParallelSize must be at least 1, got %d" $size) -}}
{{- end -}}
{{- if and (gt $gpus 0) (gt $size $gpus) -}}
{{- fail (printf "tensorParallelSize (%d) is more than gpus (%d): each rank needs its own GPU" $size $gpus) -}}
{{- end -}}
{{- if gt $gpus 0 -}}
{{- $handler := $config.handler | default dict -}}
{{- $_ := set $handler "engine" (merge (dict "device" "cuda") ($handler.engine | default dict)) -}}
{{- $_ = set $config "handler" $handler -}}
{{- $_ = set $config "deviceType" "gpu" -}}
{{- end -}}
{{- if or (gt $gpus 0) (gt $size 1) -}}
{{- $_ := set $config "parallelType" "custom" -}}
{{- $_ = set $config "parallelLevel" $size -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
